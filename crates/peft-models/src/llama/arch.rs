//! The Llama family behind the architecture seam.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use serde_json::Value;

use super::{LlamaConfig, LlamaModel};
use crate::arch::{ArchConfig, Architecture, Checkpoint, GgufArch, GgufFix, GgufSpec};
use crate::auto::{HfModel, Task};
use crate::config::HfConfig;
use crate::decoder::{DecoderHeads, HeadShape};
use crate::error::Result;

/// The family's registration: `llama` (SmolLM included), `mistral`, `qwen2`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["llama", "mistral", "qwen2"],
    parse: parse_config,
    gguf: Some(&GGUF),
};

/// llama.cpp's `llama` (Llama, SmolLM, Mistral) and `qwen2` files (gguf-py's tensor names;
/// transformers' `GGUF_CONFIG_MAPPING`: `rope.dimension_count` is the head size for Llama and
/// Mistral only).
static GGUF: GgufSpec = GgufSpec {
    architectures: &[
        GgufArch {
            name: "llama",
            model_type: "llama",
            fix: GgufFix::LlamaRopePermute,
        },
        GgufArch {
            name: "qwen2",
            model_type: "qwen2",
            fix: GgufFix::None,
        },
    ],
    config_keys: &[("llama.rope.dimension_count", "head_dim")],
    globals: &[
        ("token_embd", "model.embed_tokens"),
        ("output_norm", "model.norm"),
        ("output", "lm_head"),
    ],
    layer: &[
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("ffn_norm", "post_attention_layernorm"),
    ],
};

fn parse_config(model_type: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    Ok(Arc::new(LlamaConfig::parse(model_type, raw, file)?))
}

/// A Llama-family model with its head (`LlamaForCausalLM`, `Qwen2ForSequenceClassification`,
/// ...).
pub type Llama = DecoderHeads<LlamaModel>;

impl ArchConfig for LlamaConfig {
    fn min_parameters(&self) -> u128 {
        self.shape.min_parameters()
    }

    fn build(
        &self,
        config: &HfConfig,
        task: Task,
        weights: Option<&Checkpoint>,
        device: &Device,
    ) -> Result<HfModel> {
        let shape = HeadShape {
            hidden_size: self.shape.hidden_size,
            vocab_size: self.shape.vocab_size,
            tie_word_embeddings: self.tie_word_embeddings,
            pad_token_id: self.shape.pad_token_id,
        };
        let backbone = LlamaModel::new(self, device);
        DecoderHeads::build(config, task, backbone, shape, weights, &[], device)
    }
}
