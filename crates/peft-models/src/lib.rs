//! Model families built from burn-peft's adapter-aware layers, loaded from Hugging Face files
//! with Hugging Face module names, so PEFT `target_modules` lists and bundles apply unchanged.
//!
//! Each family lives in its own module behind the architecture seam ([`arch`]) and is
//! registered in one place (the `architectures!` invocation at the end of this file); [`HfModel`] holds a model of any of them.

#![warn(missing_docs)]

#[macro_use]
pub mod registry;

pub mod arch;
mod auto;
mod auto_peft;
pub mod base_dtype;
mod cache;
pub mod chat;
pub mod config;
mod config_checks;
pub mod decoder;
mod error;
pub mod generate;
pub mod generate_limits;
pub mod gguf;
pub mod heads;
pub mod hub;
mod input_checks;
pub mod lm_head;
pub mod load;
pub mod ops;
pub mod packing;
pub mod quantized;
pub mod rope;
mod save;
mod tokenizer;
pub mod torchvision;

pub use arch::{ArchConfig, ArchModel, Architecture};
pub use auto::{
    ChatParts, ModelInputs, ModelOutputs, Pretrained, Task, from_pretrained, load_tokenizer,
    load_tokenizer_and_chat, model_dir, read_config,
};
pub use auto_peft::AutoPeftModel;
pub use cache::KvCache;
pub use config::HfConfig;

pub use error::{ModelError, Result};
pub use generate::{GenerationConfig, generate, generate_batch};
pub use save::{
    COPIED_FILES, SavedModel, architecture_name, hf_tensors, merged_config, num_labels,
    save_pretrained, save_pretrained_with,
};
pub use tokenizer::{Batch, Encoding, HfTokenizer, pad_batch};

// The architectures: one line each (docs/architectures.md). Each line
// declares the family's module (its own file or folder) and registers its model and
// `config.json` parser.
architectures! {
    /// BERT encoders (all-MiniLM-L6-v2 is one): `bert`.
    bert: Bert(bert::Bert) => bert::ARCHITECTURE,
    /// GPT-2: `gpt2`.
    gpt2: Gpt2(gpt2::Gpt2) => gpt2::ARCHITECTURE,
    /// The Llama family: `llama` (SmolLM included), `mistral`, `qwen2`.
    llama: Llama(llama::Llama) => llama::ARCHITECTURE,
    /// Qwen3: `qwen3`.
    qwen3: Qwen3(qwen3::Qwen3) => qwen3::ARCHITECTURE,
    /// Gemma 3 text: `gemma3_text`.
    gemma3: Gemma3(gemma3::Gemma3) => gemma3::ARCHITECTURE,
    /// Phi-3 (3, 3.5, 4-mini): `phi3`.
    phi3: Phi3(phi3::Phi3) => phi3::ARCHITECTURE,
    /// ViT image encoders and classifiers: `vit`.
    vit: Vit(vit::Vit) => vit::ARCHITECTURE,
    /// torchvision's MobileNetV2 (from its `.pth`): `torchvision_mobilenet_v2`.
    mobilenet_v2: MobileNetV2(mobilenet_v2::MobileNetV2) => mobilenet_v2::ARCHITECTURE,
    /// ResNet image models (basic and bottleneck layers): `resnet`.
    resnet: ResNet(resnet::ResNet) => resnet::ARCHITECTURE,
}
