#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use peft_core as core;
pub use peft_ia3 as ia3;
pub use peft_lora as lora;
pub use peft_models as models;
pub use peft_ops as ops;
pub use peft_prefix as prefix;
pub use peft_train as train;

/// The types most programs need.
pub mod prelude {
    pub use peft_core::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
    pub use peft_core::{Adaptable, PeftConfigBase, PeftMethod, PeftModel, TargetModules};
    pub use peft_ia3::Ia3Config;
    pub use peft_lora::{InitLoraWeights, LoraConfig};
    pub use peft_prefix::PrefixTuningConfig;
}
