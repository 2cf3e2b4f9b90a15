//! Hugging Face `config.json`: which architecture, and its hyper-parameters.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

fn default_bert_eps() -> f64 {
    1e-12
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_gpt2_eps() -> f64 {
    1e-5
}
fn default_gelu_new() -> String {
    "gelu_new".into()
}
fn default_true() -> bool {
    true
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_silu() -> String {
    "silu".into()
}

/// `BertConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP size.
    pub intermediate_size: usize,
    /// Activation (`gelu` = erf form).
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    /// Position table size.
    pub max_position_embeddings: usize,
    /// Token type table size.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon (1e-12 for BERT).
    #[serde(default = "default_bert_eps")]
    pub layer_norm_eps: f64,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: Option<usize>,
}

/// `GPT2Config`.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// Position table size.
    pub n_positions: usize,
    /// MLP size (default 4 * n_embd).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// LayerNorm epsilon.
    #[serde(default = "default_gpt2_eps")]
    pub layer_norm_epsilon: f64,
    /// Activation (`gelu_new` = tanh form).
    #[serde(default = "default_gelu_new")]
    pub activation_function: String,
    /// Whether lm_head shares wte.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// `scale_attn_weights` (1/sqrt(d) scaling).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// `scale_attn_by_inverse_layer_idx` (scores also divided by layer index + 1).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
}

impl Gpt2Config {
    /// The attention score scale of layer `layer` (0-based), as transformers' `GPT2Attention`:
    /// `1/sqrt(head_dim)` when `scale_attn_weights` (the default), else 1, and divided by
    /// `layer + 1` when `scale_attn_by_inverse_layer_idx`.
    pub fn attention_scale(&self, layer: usize) -> f64 {
        let head_dim = (self.n_embd / self.n_head.max(1)).max(1) as f64;
        let base = if self.scale_attn_weights {
            1.0 / head_dim.sqrt()
        } else {
            1.0
        };
        if self.scale_attn_by_inverse_layer_idx {
            base / (layer + 1) as f64
        } else {
            base
        }
    }
}

/// `LlamaConfig` (also Qwen2 and Mistral, which differ only by config).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `qwen2` or `mistral`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP size.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head size; defaults to hidden / heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4.x layout).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4.x layout).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// RoPE parameters (transformers 5.x layout: `rope_type`, `rope_theta`, ...).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Whether lm_head shares embed_tokens.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// MLP activation.
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    /// Bias on q/k/v/o (Llama option).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Padding token (sequence classification pools the last non-pad token).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// End-of-sequence token(s).
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    /// Mistral/Qwen2 sliding window.
    #[serde(default)]
    pub sliding_window: Option<Value>,
    /// Qwen2: whether the sliding window is used.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
}

/// How RoPE frequencies are built.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Factor.
        factor: f64,
    },
    /// Llama 3 frequency-dependent scaling.
    Llama3 {
        /// Factor.
        factor: f64,
        /// Low frequency factor.
        low_freq_factor: f64,
        /// High frequency factor.
        high_freq_factor: f64,
        /// Context length of the original model.
        original_max_position_embeddings: f64,
    },
}

impl LlamaConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one head.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// q/k/v projections have a bias (always for Qwen2).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias
    }

    /// The RoPE base.
    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0)
    }

    /// The RoPE scaling, or an error naming what is unsupported.
    pub fn scaling(&self, file: &Path) -> Result<RopeScaling> {
        let params = self.rope_scaling.as_ref().or(self.rope_parameters.as_ref());
        let Some(params) = params.filter(|p| !p.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            params
                .get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| ModelError::InvalidConfig {
                    file: file.to_path_buf(),
                    reason: format!("rope scaling `{kind}` needs a numeric `{key}`"),
                })
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }),
            other => Err(ModelError::UnsupportedOption {
                file: file.to_path_buf(),
                key: "rope_scaling.rope_type".into(),
                found: format!("\"{other}\""),
                reason: "implemented: default, linear, llama3".into(),
            }),
        }
    }

    /// End-of-sequence ids.
    pub fn eos_ids(&self) -> Vec<i64> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
            _ => Vec::new(),
        }
    }
}

/// The architecture named by `config.json`.
#[allow(clippy::large_enum_variant)] // parsed once per model
#[derive(Debug, Clone)]
pub enum ModelConfig {
    /// BERT (and MiniLM, which is a BERT).
    Bert(BertConfig),
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// Llama, Qwen2, Mistral.
    Llama(LlamaConfig),
}

/// A parsed `config.json` with what every architecture shares.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// The file it came from.
    pub file: PathBuf,
    /// `model_type`.
    pub model_type: String,
    /// `architectures` (e.g. `BertForSequenceClassification`).
    pub architectures: Vec<String>,
    /// Number of labels for classification heads (`id2label` length or `num_labels`).
    pub num_labels: Option<usize>,
    /// The architecture-specific part.
    pub model: ModelConfig,
    /// The raw JSON, for writing merged models back.
    pub raw: Value,
}

impl HfConfig {
    /// Read and parse `config.json`.
    pub fn read(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file).map_err(|source| ModelError::Io {
            file: file.to_path_buf(),
            source,
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            file: file.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_value(raw, file)
    }

    /// Parse a config value; `file` names it in errors.
    pub fn from_value(raw: Value, file: &Path) -> Result<Self> {
        let invalid =
            |e: serde_path_to_error::Error<serde_json::Error>| ModelError::InvalidConfig {
                file: file.to_path_buf(),
                reason: format!("`{}`: {}", e.path(), e.inner()),
            };
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::InvalidConfig {
                file: file.to_path_buf(),
                reason: "missing `model_type`".into(),
            })?
            .to_string();
        // Checked once here (sizes, head counts, activations, options that change the math),
        // so building and running the model cannot fail on the config later.
        let model = match model_type.as_str() {
            "bert" => {
                let cfg: BertConfig =
                    serde_path_to_error::deserialize(raw.clone()).map_err(invalid)?;
                cfg.validate(file, &raw)?;
                ModelConfig::Bert(cfg)
            }
            "gpt2" => {
                let cfg: Gpt2Config =
                    serde_path_to_error::deserialize(raw.clone()).map_err(invalid)?;
                cfg.validate(file, &raw)?;
                ModelConfig::Gpt2(cfg)
            }
            "llama" | "qwen2" | "mistral" => {
                let cfg: LlamaConfig =
                    serde_path_to_error::deserialize(raw.clone()).map_err(invalid)?;
                cfg.validate(file)?;
                ModelConfig::Llama(cfg)
            }
            other => {
                return Err(ModelError::UnsupportedArchitecture {
                    file: file.to_path_buf(),
                    found: other.to_string(),
                });
            }
        };
        let architectures = raw
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let num_labels = raw
            .get("id2label")
            .and_then(Value::as_object)
            .map(|m| m.len())
            .or_else(|| {
                raw.get("num_labels")
                    .and_then(Value::as_u64)
                    .map(|n| n as usize)
            });
        Ok(Self {
            file: file.to_path_buf(),
            model_type,
            architectures,
            num_labels,
            model,
            raw,
        })
    }

    /// The positions of a learned position table and the key that sets it (BERT's
    /// `max_position_embeddings`, GPT-2's `n_positions`); `None` for RoPE models.
    pub fn position_limit(&self) -> Option<(usize, &'static str)> {
        match &self.model {
            ModelConfig::Bert(c) => Some((c.max_position_embeddings, "max_position_embeddings")),
            ModelConfig::Gpt2(c) => Some((c.n_positions, "n_positions")),
            ModelConfig::Llama(_) => None,
        }
    }

    /// Whether `architectures` names a sequence classifier.
    pub fn is_sequence_classifier(&self) -> bool {
        self.architectures
            .iter()
            .any(|a| a.ends_with("ForSequenceClassification"))
    }
}
