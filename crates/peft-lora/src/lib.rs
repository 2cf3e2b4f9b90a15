//! LoRA (and DoRA, `use_dora`) for burn-peft, compatible with Hugging Face PEFT: same config,
//! same math, same files.
//!
//! Linking this crate registers the `LORA` method with `peft-core`.

#![warn(missing_docs)]

pub mod combine;
mod config;
mod describe;
mod dora;
mod kernel;

pub use config::{InitLoraWeights, LoraConfig};
pub use dora::{DoraEmbeddingKernel, DoraLinearKernel};
pub use kernel::{LoraEmbeddingKernel, LoraLinearKernel};
