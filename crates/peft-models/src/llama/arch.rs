//! The Llama family behind the architecture seam.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::Device;
use serde_json::Value;

use super::{LlamaConfig, LlamaModel};
use crate::arch::{ArchConfig, Architecture, Checkpoint};
use crate::auto::{HfModel, Task};
use crate::config::HfConfig;
use crate::decoder::{DecoderHeads, HeadShape};
use crate::error::Result;

/// The family's registration: `llama` (SmolLM included), `mistral`, `qwen2`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["llama", "mistral", "qwen2"],
    parse: parse_config,
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
