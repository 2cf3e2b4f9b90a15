//! The Llama family's `config.json`: transformers' Llama, Mistral and Qwen2 share the
//! modules and differ only in config defaults, which [`FLAVORS`] states as data.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::arch::PeftDefaults;
use crate::config::parse_json;
use crate::config_checks::unsupported;
use crate::decoder::{DecoderShape, sliding_window};
use crate::error::{ModelError, Result};
use crate::rope::{RopeConfig, RopeContext};

/// A `model_type` of the family and what it changes.
#[derive(Debug)]
pub struct Flavor {
    /// `model_type`.
    pub model_type: &'static str,
    /// The transformers class prefix (`Qwen2` in `Qwen2ForCausalLM`).
    pub class_prefix: &'static str,
    /// q/k/v projections always carry a bias (Qwen2), whatever `attention_bias` says.
    pub qkv_bias: bool,
    /// `sliding_window` limits attention (Mistral); the others parse it but attend fully.
    pub uses_window: bool,
    /// `use_sliding_window: true` asks for Qwen2's per-layer window (`max_window_layers`),
    /// which is not implemented: refused.
    pub per_layer_window_switch: bool,
    /// PEFT's defaults for the model type (`peft/utils/constants.py`).
    pub peft: PeftDefaults,
}

const LLAMA_LORA: &[&str] = &["q_proj", "v_proj"];
const LLAMA_IA3: &[&str] = &["k_proj", "v_proj", "down_proj"];
const QWEN2_IA3: &[&str] = &["q_proj", "v_proj", "down_proj"];
const DOWN: &[&str] = &["down_proj"];

/// The model types of the family.
pub static FLAVORS: [Flavor; 3] = [
    Flavor {
        model_type: "llama",
        class_prefix: "Llama",
        qkv_bias: false,
        uses_window: false,
        per_layer_window_switch: false,
        peft: PeftDefaults {
            lora: Some(LLAMA_LORA),
            ia3: Some(LLAMA_IA3),
            ia3_feedforward: Some(DOWN),
        },
    },
    Flavor {
        model_type: "mistral",
        class_prefix: "Mistral",
        qkv_bias: false,
        uses_window: true,
        per_layer_window_switch: false,
        peft: PeftDefaults {
            lora: Some(LLAMA_LORA),
            ia3: Some(LLAMA_IA3),
            ia3_feedforward: Some(DOWN),
        },
    },
    Flavor {
        model_type: "qwen2",
        class_prefix: "Qwen2",
        qkv_bias: true,
        uses_window: false,
        per_layer_window_switch: true,
        peft: PeftDefaults {
            lora: Some(LLAMA_LORA),
            ia3: Some(QWEN2_IA3),
            ia3_feedforward: Some(DOWN),
        },
    },
];

fn default_silu() -> String {
    "silu".into()
}

/// The keys beyond the decoder shape.
#[derive(Debug, Deserialize)]
struct LlamaKeys {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_silu")]
    hidden_act: String,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

/// A checked Llama-family config.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Sizes.
    pub shape: DecoderShape,
    /// Which model type.
    pub flavor: &'static Flavor,
    /// The rotary embedding.
    pub rope: RopeConfig,
    /// Whether lm_head shares embed_tokens.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v.
    pub qkv_bias: bool,
    /// Bias on o (`attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// The attention window of every layer (Mistral's `sliding_window`), `None` for full
    /// attention.
    pub window: Option<usize>,
}

impl LlamaConfig {
    /// Parse and check `raw` as `model_type`.
    pub fn parse(model_type: &str, raw: &Value, file: &Path) -> Result<Self> {
        let flavor = FLAVORS
            .iter()
            .find(|f| f.model_type == model_type)
            .ok_or_else(|| ModelError::InvalidConfig {
                file: file.to_path_buf(),
                reason: format!("`model_type` {model_type} is not of the Llama family"),
            })?;
        let shape: DecoderShape = parse_json(raw, file)?;
        shape.validate(file)?;
        let keys: LlamaKeys = parse_json(raw, file)?;
        if keys.hidden_act != "silu" {
            return Err(unsupported(
                file,
                "hidden_act",
                format!("\"{}\"", keys.hidden_act),
                "Llama-family MLPs are implemented with silu",
            ));
        }
        // transformers 4.x writes `rope_theta` + `rope_scaling`, 5.x `rope_parameters`.
        let (block, key) = match (&keys.rope_scaling, &keys.rope_parameters) {
            (Some(s), _) if !s.is_null() => (Some(s), "rope_scaling"),
            (_, p) => (p.as_ref(), "rope_parameters"),
        };
        let rope = RopeConfig::parse(
            block,
            &RopeContext {
                file,
                key,
                theta: keys.rope_theta.unwrap_or(10000.0),
                head_dim: shape.head_size(),
                partial_rotary_factor: 1.0,
                max_position_embeddings: shape.max_position_embeddings,
            },
        )?;
        let window = sliding_window(raw, file)?;
        if flavor.per_layer_window_switch && keys.use_sliding_window == Some(true) {
            return Err(unsupported(
                file,
                "use_sliding_window",
                true,
                "Qwen2's per-layer sliding window (max_window_layers) is not implemented; \
                 set use_sliding_window to false to attend over the full context",
            ));
        }
        Ok(Self {
            flavor,
            rope,
            tie_word_embeddings: keys.tie_word_embeddings,
            qkv_bias: flavor.qkv_bias || keys.attention_bias,
            o_bias: keys.attention_bias,
            mlp_bias: keys.mlp_bias,
            window: window.filter(|_| flavor.uses_window),
            shape,
        })
    }
}
