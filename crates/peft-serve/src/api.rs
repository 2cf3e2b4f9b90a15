//! The request and response bodies of the HTTP API, OpenAI-compatible where OpenAI has the
//! endpoint (`/v1/completions`, `/v1/embeddings`, `/v1/models`); `/v1/classify` follows vLLM's.
//!
//! Requests are parsed with the path of the field at fault ([`parse`]), then checked
//! (`validate`), so a bad body answers 400 naming the field and the reason.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Parse a JSON body; a syntax error or a field of the wrong type is a 400 naming the field.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.inner().to_string();
        if matches!(path.as_str(), "" | "." | "?") {
            ApiError::bad_request(format!("the request body is not valid: {reason}"))
        } else {
            ApiError::bad_field(&path, format!("field `{path}`: {reason}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("trailing data after the JSON body: {e}")))?;
    Ok(value)
}

/// Text to run: a string, several strings, token ids, or several lists of token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, or an array of token ids"
)]
pub enum Input {
    /// One text.
    Text(String),
    /// Token ids of one text.
    Tokens(Vec<i64>),
    /// Several texts.
    Texts(Vec<String>),
    /// Token ids of several texts.
    TokenLists(Vec<Vec<i64>>),
}

impl Input {
    /// Each text, as text or as token ids.
    pub fn items(&self) -> Vec<InputItem<'_>> {
        match self {
            Input::Text(t) => vec![InputItem::Text(t)],
            Input::Tokens(ids) => vec![InputItem::Tokens(ids)],
            Input::Texts(ts) => ts.iter().map(|t| InputItem::Text(t)).collect(),
            Input::TokenLists(ls) => ls.iter().map(|l| InputItem::Tokens(l)).collect(),
        }
    }
}

/// One text of an [`Input`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputItem<'a> {
    /// Text for the tokenizer.
    Text(&'a str),
    /// Token ids as given.
    Tokens(&'a [i64]),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The adapter to run (`base` for none).
    pub model: String,
    /// The prompt: a string, or token ids (one prompt per request).
    pub prompt: Input,
    /// Tokens to generate at most (OpenAI's default: 16).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// 0 = greedy (OpenAI's default: 1).
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probability reaches `top_p`.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Keep only the `top_k` most likely tokens (`-1` or `0`: all, as in vLLM).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Sampling seed (random when absent).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop before any of these strings (needs the model's tokenizer).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Send tokens as server-sent events as they are generated.
    #[serde(default)]
    pub stream: bool,
    /// Completions per prompt: only 1 is supported.
    #[serde(default)]
    pub n: Option<usize>,
    /// Token ids that end the generation as the end-of-sequence token does, left out of the
    /// text (vLLM's extension).
    #[serde(default)]
    pub stop_token_ids: Option<Vec<i64>>,
}

/// Stop token ids a request may give.
pub const MAX_STOP_TOKEN_IDS: usize = 64;

/// Stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// Longest stop string, in bytes: every generated token checks the text released since the
/// last one, plus this many bytes before it, for each stop string.
pub const MAX_STOP_BYTES: usize = 256;

fn default_max_tokens() -> usize {
    16
}

fn default_temperature() -> f32 {
    1.0
}

/// A [`CompletionRequest`] after its checks.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Top-k sampling.
    pub top_k: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Tokens that end the generation besides the model's end-of-sequence ids.
    pub stop_token_ids: Vec<i64>,
}

impl CompletionRequest {
    /// Check the sampling fields; 400 naming the field otherwise.
    pub fn sampling(&self) -> Result<Sampling, ApiError> {
        if self.max_tokens == 0 {
            return Err(ApiError::bad_field(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ApiError::bad_field(
                "temperature",
                format!(
                    "temperature must be a finite number >= 0, found {}",
                    self.temperature
                ),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::bad_field(
                "top_p",
                format!("top_p must be in (0, 1], found {p}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => {
                return Err(ApiError::bad_field(
                    "top_k",
                    format!("top_k must be -1 (all tokens) or at least 1, found {k}"),
                ));
            }
        };
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad_field(
                "n",
                format!("only n = 1 is supported, found {n}; send several requests instead"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS
            || stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(ApiError::bad_field(
                "stop",
                format!(
                    "stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most \
                     {MAX_STOP_BYTES} bytes each"
                ),
            ));
        }
        let stop_token_ids = self.stop_token_ids.clone().unwrap_or_default();
        if stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(ApiError::bad_field(
                "stop_token_ids",
                format!(
                    "stop_token_ids holds {} ids; at most {MAX_STOP_TOKEN_IDS} are taken",
                    stop_token_ids.len()
                ),
            ));
        }
        Ok(Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k,
            seed: self.seed.unwrap_or_else(rand::random),
            stop,
            stop_token_ids,
        })
    }
}

/// Tokens counted for a request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt(s).
    pub prompt_tokens: usize,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// One choice of a completion (or, streamed, one chunk of it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// Always 0 (one choice per request).
    pub index: usize,
    /// The generated text (empty without a tokenizer); in a stream, the new part.
    pub text: String,
    /// The generated token ids (an extension, as vLLM's `return_token_ids`); in a stream, the
    /// new ones.
    pub token_ids: Vec<i64>,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` (end of sequence or a stop string), `length` (max_tokens); null while streaming.
    pub finish_reason: Option<String>,
}

/// The `/v1/completions` answer (and, with `object: text_completion`, each stream chunk).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The adapter that ran.
    pub model: String,
    /// One choice.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (in a stream: on the last chunk only).
    pub usage: Option<Usage>,
}

/// `POST /v1/embeddings` and `POST /v1/classify`.
#[derive(Debug, Clone, Deserialize)]
pub struct InputRequest {
    /// The adapter to run (`base` for none).
    pub model: String,
    /// What to embed or classify.
    pub input: Input,
    /// `float` (default) or `base64` (OpenAI's `encoding_format`; the OpenAI SDK asks for
    /// `base64` unless told otherwise).
    #[serde(default)]
    pub encoding_format: Option<String>,
}

/// One embedding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Embedding {
    /// `embedding`.
    pub object: String,
    /// Its position in the input.
    pub index: usize,
    /// Mean-pooled, L2-normalised.
    pub embedding: EmbeddingVector,
}

/// An embedding as `encoding_format` asks: numbers, or base64 of little-endian f32 bytes (as
/// OpenAI returns it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `float`.
    Float(Vec<f32>),
    /// `base64`.
    Base64(String),
}

impl EmbeddingVector {
    /// `values` in the format `encoding_format` names (`None`: `float`).
    pub fn encode(values: Vec<f32>, base64: bool) -> Self {
        if !base64 {
            return Self::Float(values);
        }
        use base64::Engine as _;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

/// The `/v1/embeddings` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// `list`.
    pub object: String,
    /// One per input.
    pub data: Vec<Embedding>,
    /// The adapter that ran.
    pub model: String,
    /// Token counts.
    pub usage: Usage,
}

/// One classified input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Classification {
    /// Its position in the input.
    pub index: usize,
    /// The most likely label (`id2label` of config.json, else `LABEL_i`).
    pub label: String,
    /// Softmax probabilities, one per label.
    pub probs: Vec<f32>,
    /// Number of labels.
    pub num_classes: usize,
}

/// The `/v1/classify` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifyResponse {
    /// `classify-…`.
    pub id: String,
    /// `list`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The adapter that ran.
    pub model: String,
    /// One per input.
    pub data: Vec<Classification>,
    /// Token counts.
    pub usage: Usage,
}

/// One entry of `/v1/models`: the base model or an adapter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    /// The name to put in a request's `model`.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds when it was loaded.
    pub created: u64,
    /// `burn-peft`.
    pub owned_by: String,
    /// `null` for the base model, else `base`.
    pub parent: Option<String>,
    /// The base model's source (base) or the adapter's folder.
    pub root: String,
    /// The adapter's `peft_type` (absent for the base model).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peft_type: Option<String>,
}

/// The `/v1/models` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The base model first, then the adapters in load order.
    pub data: Vec<ModelCard>,
}

/// `POST /v1/adapters`.
#[derive(Debug, Clone, Deserialize)]
pub struct LoadAdapterRequest {
    /// The name requests will use in `model`.
    pub name: String,
    /// The bundle folder, relative to `--adapters-dir`.
    pub path: String,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_the_field() {
        let err = parse::<CompletionRequest>(br#"{"model":"base","prompt":"hi","max_tokens":"x"}"#)
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
        let err = parse::<CompletionRequest>(br#"{"model":"base"}"#).unwrap_err();
        assert!(err.message.contains("prompt"), "{}", err.message);
        let err = parse::<CompletionRequest>(b"{not json").unwrap_err();
        assert_eq!(err.param, None);
        let ok = parse::<CompletionRequest>(br#"{"model":"a","prompt":[1,2]}"#).unwrap();
        assert_eq!(ok.prompt, Input::Tokens(vec![1, 2]));
        assert_eq!(ok.max_tokens, 16);
    }

    #[test]
    fn sampling_checks() {
        let req = |extra: &str| {
            parse::<CompletionRequest>(format!(r#"{{"model":"a","prompt":"x"{extra}}}"#).as_bytes())
                .unwrap()
                .sampling()
        };
        assert_eq!(
            req(r#","top_p":0"#).unwrap_err().param.as_deref(),
            Some("top_p")
        );
        assert_eq!(
            req(r#","top_k":-3"#).unwrap_err().param.as_deref(),
            Some("top_k")
        );
        assert_eq!(
            req(r#","max_tokens":0"#).unwrap_err().param.as_deref(),
            Some("max_tokens")
        );
        assert_eq!(req(r#","n":2"#).unwrap_err().param.as_deref(), Some("n"));
        assert_eq!(
            req(r#","stop":["a",""]"#).unwrap_err().param.as_deref(),
            Some("stop")
        );
        let s = req(r#","stop":"\n","top_k":-1,"seed":3"#).unwrap();
        assert_eq!((s.stop, s.top_k, s.seed), (vec!["\n".to_string()], None, 3));
    }
}
