//! BERT (MiniLM), GPT-2 and Llama-family models built from burn-peft's adapter-aware layers,
//! loaded from Hugging Face files with Hugging Face module names, so PEFT `target_modules`
//! lists and bundles apply unchanged.

#![warn(missing_docs)]

mod auto;
pub mod bert;
mod cache;
pub mod config;
mod config_checks;
mod error;
pub mod generate;
pub mod gpt2;
pub mod heads;
pub mod hub;
mod input_checks;
pub mod llama;
pub mod load;
mod names;
pub mod ops;
mod save;
mod tokenizer;

pub use auto::{
    HfModel, ModelInputs, ModelOutputs, Pretrained, Task, from_pretrained, model_dir, read_config,
};
pub use cache::KvCache;
pub use config::{HfConfig, ModelConfig};
pub use error::{ModelError, Result};
pub use generate::{GenerationConfig, generate, generate_batch};
pub use save::{
    COPIED_FILES, SavedModel, architecture_name, hf_tensors, merged_config, num_labels,
    save_pretrained,
};
pub use tokenizer::{Batch, Encoding, HfTokenizer, pad_batch};
