//! LoRA for burn-peft, compatible with Hugging Face PEFT: same config, same math, same files.
//!
//! Linking this crate registers the `LORA` method with `peft-core`.

#![warn(missing_docs)]

pub mod combine;
mod config;
mod kernel;

pub use config::{InitLoraWeights, LoraConfig};
pub use kernel::{LoraEmbeddingKernel, LoraLinearKernel};
