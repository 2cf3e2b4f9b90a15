//! BERT's `config.json` (transformers' `BertConfig`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::parse_json;
use crate::config_checks::{activation, divides, epsilon, flag, positive, unsupported};
use crate::error::Result;

fn default_bert_eps() -> f64 {
    1e-12
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
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

impl BertConfig {
    /// Parse and check `raw`: sizes, head counts, the activation, and the options that change
    /// the math (relative positions, decoder use) refused.
    pub fn parse(raw: &Value, file: &Path) -> Result<Self> {
        let c: Self = parse_json(raw, file)?;
        positive(file, "vocab_size", c.vocab_size)?;
        positive(file, "hidden_size", c.hidden_size)?;
        positive(file, "num_hidden_layers", c.num_hidden_layers)?;
        positive(file, "num_attention_heads", c.num_attention_heads)?;
        positive(file, "intermediate_size", c.intermediate_size)?;
        positive(file, "max_position_embeddings", c.max_position_embeddings)?;
        positive(file, "type_vocab_size", c.type_vocab_size)?;
        divides(
            file,
            ("hidden_size", c.hidden_size),
            ("num_attention_heads", c.num_attention_heads),
        )?;
        epsilon(file, "layer_norm_eps", c.layer_norm_eps)?;
        activation(file, "hidden_act", &c.hidden_act)?;
        if let Some(kind) = raw.get("position_embedding_type").and_then(Value::as_str)
            && kind != "absolute"
        {
            return Err(unsupported(
                file,
                "position_embedding_type",
                format!("\"{kind}\""),
                "only absolute position embeddings are implemented",
            ));
        }
        for key in ["is_decoder", "add_cross_attention"] {
            if flag(raw, key) {
                return Err(unsupported(
                    file,
                    key,
                    true,
                    "BERT is implemented as a bidirectional encoder without cross-attention",
                ));
            }
        }
        Ok(c)
    }
}
