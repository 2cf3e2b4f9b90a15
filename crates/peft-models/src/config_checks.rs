//! `config.json` is checked once, when it is read: sizes that would divide by zero or build
//! empty layers, head counts that do not divide, activations we do not implement, and options
//! we parse but that would change the math if we ignored them. Every failure names the file,
//! the key, what was found and what is expected.

use std::path::Path;

use serde_json::Value;

use crate::config::{BertConfig, Gpt2Config, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::ops::Activation;

fn invalid(file: &Path, key: &str, found: impl std::fmt::Display, expected: &str) -> ModelError {
    ModelError::InvalidConfig {
        file: file.to_path_buf(),
        reason: format!("`{key}` = {found}: {expected}"),
    }
}

fn unsupported(file: &Path, key: &str, found: impl std::fmt::Display, reason: &str) -> ModelError {
    ModelError::UnsupportedOption {
        file: file.to_path_buf(),
        key: key.into(),
        found: found.to_string(),
        reason: reason.into(),
    }
}

fn positive(file: &Path, key: &str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(invalid(file, key, 0, "must be at least 1"));
    }
    Ok(())
}

fn divides(file: &Path, (key, value): (&str, usize), (by, by_value): (&str, usize)) -> Result<()> {
    if !value.is_multiple_of(by_value) {
        return Err(invalid(
            file,
            key,
            value,
            &format!("must be a multiple of `{by}` ({by_value})"),
        ));
    }
    Ok(())
}

fn epsilon(file: &Path, key: &str, value: f64) -> Result<()> {
    // Burn's LayerNorm / RmsNorm refuse (panic on) an epsilon that is not positive.
    if !value.is_finite() || value <= 0.0 {
        return Err(invalid(
            file,
            key,
            value,
            "must be a finite number > 0 (e.g. 1e-5)",
        ));
    }
    Ok(())
}

fn activation(file: &Path, key: &str, name: &str) -> Result<Activation> {
    Activation::from_hf(name).ok_or_else(|| {
        unsupported(
            file,
            key,
            format!("\"{name}\""),
            &format!("implemented: {}", Activation::NAMES.join(", ")),
        )
    })
}

fn flag(raw: &Value, key: &str) -> bool {
    raw.get(key).and_then(Value::as_bool).unwrap_or(false)
}

impl BertConfig {
    /// Check the sizes and options (see the module documentation).
    pub(crate) fn validate(&self, file: &Path, raw: &Value) -> Result<()> {
        positive(file, "vocab_size", self.vocab_size)?;
        positive(file, "hidden_size", self.hidden_size)?;
        positive(file, "num_hidden_layers", self.num_hidden_layers)?;
        positive(file, "num_attention_heads", self.num_attention_heads)?;
        positive(file, "intermediate_size", self.intermediate_size)?;
        positive(
            file,
            "max_position_embeddings",
            self.max_position_embeddings,
        )?;
        positive(file, "type_vocab_size", self.type_vocab_size)?;
        divides(
            file,
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
        )?;
        epsilon(file, "layer_norm_eps", self.layer_norm_eps)?;
        activation(file, "hidden_act", &self.hidden_act)?;
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
        Ok(())
    }
}

impl Gpt2Config {
    /// Check the sizes and options (see the module documentation).
    pub(crate) fn validate(&self, file: &Path, raw: &Value) -> Result<()> {
        positive(file, "vocab_size", self.vocab_size)?;
        positive(file, "n_embd", self.n_embd)?;
        positive(file, "n_layer", self.n_layer)?;
        positive(file, "n_head", self.n_head)?;
        positive(file, "n_positions", self.n_positions)?;
        if let Some(inner) = self.n_inner {
            positive(file, "n_inner", inner)?;
        }
        divides(file, ("n_embd", self.n_embd), ("n_head", self.n_head))?;
        epsilon(file, "layer_norm_epsilon", self.layer_norm_epsilon)?;
        activation(file, "activation_function", &self.activation_function)?;
        if flag(raw, "add_cross_attention") {
            return Err(unsupported(
                file,
                "add_cross_attention",
                true,
                "GPT-2 is implemented without cross-attention",
            ));
        }
        Ok(())
    }
}

impl LlamaConfig {
    /// Check the sizes and options (see the module documentation).
    pub(crate) fn validate(&self, file: &Path) -> Result<()> {
        positive(file, "vocab_size", self.vocab_size)?;
        positive(file, "hidden_size", self.hidden_size)?;
        positive(file, "intermediate_size", self.intermediate_size)?;
        positive(file, "num_hidden_layers", self.num_hidden_layers)?;
        positive(file, "num_attention_heads", self.num_attention_heads)?;
        positive(file, "num_key_value_heads", self.kv_heads())?;
        divides(
            file,
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        )?;
        match self.head_dim {
            Some(d) => positive(file, "head_dim", d)?,
            None => divides(
                file,
                ("hidden_size", self.hidden_size),
                ("num_attention_heads", self.num_attention_heads),
            )?,
        }
        if !self.head_size().is_multiple_of(2) {
            return Err(invalid(
                file,
                "head_dim",
                self.head_size(),
                "rotary embeddings need an even head size",
            ));
        }
        epsilon(file, "rms_norm_eps", self.rms_norm_eps)?;
        let theta = self.theta();
        if !theta.is_finite() || theta <= 0.0 {
            return Err(invalid(
                file,
                "rope_theta",
                theta,
                "must be a finite number > 0",
            ));
        }
        if self.hidden_act != "silu" {
            return Err(unsupported(
                file,
                "hidden_act",
                format!("\"{}\"", self.hidden_act),
                "Llama-family MLPs are implemented with silu",
            ));
        }
        self.scaling(file)?;
        self.check_sliding_window(file)?;
        Ok(())
    }

    /// The attention window of Mistral (`sliding_window`): each query sees only the keys of
    /// the last `w` positions, itself included (transformers' `sliding_window_overlay`:
    /// `kv_idx > q_idx - sliding_window`). `None` for full attention: Llama has no window, and
    /// Qwen2 parses one it uses only with `use_sliding_window` (refused by validation).
    pub fn attention_window(&self) -> Option<usize> {
        match (&self.sliding_window, self.model_type.as_str()) {
            (Some(Value::Number(n)), "mistral") => {
                n.as_u64().filter(|w| *w > 0).map(|w| w as usize)
            }
            _ => None,
        }
    }

    fn check_sliding_window(&self, file: &Path) -> Result<()> {
        match &self.sliding_window {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_u64().is_some_and(|w| w > 0) => {}
            Some(other) => {
                return Err(invalid(
                    file,
                    "sliding_window",
                    other,
                    "must be a positive integer or null",
                ));
            }
        }
        if self.model_type == "qwen2" && self.use_sliding_window == Some(true) {
            return Err(unsupported(
                file,
                "use_sliding_window",
                true,
                "Qwen2's per-layer sliding window (max_window_layers) is not implemented; \
                 set use_sliding_window to false to attend over the full context",
            ));
        }
        Ok(())
    }
}

/// `a * b` (saturating), for parameter counts of any size.
fn mul(parts: &[usize]) -> u128 {
    parts
        .iter()
        .fold(1u128, |n, p| n.saturating_mul(*p as u128))
}

impl crate::config::HfConfig {
    /// A lower bound of the backbone's parameter count (weights of the embeddings, attention,
    /// MLP and norms; no biases, no head). A `config.json` whose bound exceeds what the weights
    /// file holds does not belong to those weights, and building the model from it could ask
    /// for more memory than the machine has.
    pub fn min_parameters(&self) -> u128 {
        use crate::config::ModelConfig;
        let sum = |v: &[u128]| v.iter().fold(0u128, |a, b| a.saturating_add(*b));
        match &self.model {
            ModelConfig::Bert(c) => {
                let (h, i) = (c.hidden_size, c.intermediate_size);
                let layer = sum(&[mul(&[4, h, h]), mul(&[2, h, i]), mul(&[4, h])]);
                sum(&[
                    mul(&[c.vocab_size, h])
                        .saturating_add(mul(&[c.max_position_embeddings, h]))
                        .saturating_add(mul(&[c.type_vocab_size, h])),
                    layer.saturating_mul(c.num_hidden_layers as u128),
                ])
            }
            ModelConfig::Gpt2(c) => {
                let h = c.n_embd;
                let inner = c.n_inner.unwrap_or(h.saturating_mul(4));
                let layer = sum(&[mul(&[4, h, h]), mul(&[2, h, inner]), mul(&[4, h])]);
                sum(&[
                    mul(&[c.vocab_size, h]).saturating_add(mul(&[c.n_positions, h])),
                    layer.saturating_mul(c.n_layer as u128),
                ])
            }
            ModelConfig::Llama(c) => {
                let (h, d) = (c.hidden_size, c.head_size());
                let layer = sum(&[
                    mul(&[2, h, c.num_attention_heads, d]),
                    mul(&[2, h, c.kv_heads(), d]),
                    mul(&[3, h, c.intermediate_size]),
                    mul(&[2, h]),
                ]);
                sum(&[
                    mul(&[c.vocab_size, h]),
                    layer.saturating_mul(c.num_hidden_layers as u128),
                ])
            }
        }
    }
}
