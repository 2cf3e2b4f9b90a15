//! GPT-2's `config.json` (transformers' `GPT2Config`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::parse_json;
use crate::config_checks::{activation, divides, epsilon, flag, positive, unsupported};
use crate::error::Result;

fn default_gpt2_eps() -> f64 {
    1e-5
}
fn default_gelu_new() -> String {
    "gelu_new".into()
}
fn default_true() -> bool {
    true
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
    /// Padding token (the classifier pools the last non-pad token).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

impl Gpt2Config {
    /// Parse and check `raw`: sizes, head counts, the activation, and cross-attention refused.
    pub fn parse(raw: &Value, file: &Path) -> Result<Self> {
        let c: Self = parse_json(raw, file)?;
        positive(file, "vocab_size", c.vocab_size)?;
        positive(file, "n_embd", c.n_embd)?;
        positive(file, "n_layer", c.n_layer)?;
        positive(file, "n_head", c.n_head)?;
        positive(file, "n_positions", c.n_positions)?;
        if let Some(inner) = c.n_inner {
            positive(file, "n_inner", inner)?;
        }
        divides(file, ("n_embd", c.n_embd), ("n_head", c.n_head))?;
        epsilon(file, "layer_norm_epsilon", c.layer_norm_epsilon)?;
        activation(file, "activation_function", &c.activation_function)?;
        if flag(raw, "add_cross_attention") {
            return Err(unsupported(
                file,
                "add_cross_attention",
                true,
                "GPT-2 is implemented without cross-attention",
            ));
        }
        Ok(c)
    }

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
