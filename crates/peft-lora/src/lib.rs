//! LoRA (and DoRA, `use_dora`) for burn-peft, compatible with Hugging Face PEFT: same config,
//! same math, same files.
//!
//! Linking this crate registers the `LORA` method with `peft-core`.

#![warn(missing_docs)]

mod builder;
pub mod combine;
mod config;
pub mod conv;
mod describe;
mod dora;
mod kernel;
pub mod kohya;

pub use config::{InitLoraWeights, LoraConfig, LoraUnsupported};
pub use dora::{DoraEmbeddingKernel, DoraLinearKernel};
pub use kernel::{LoraEmbeddingKernel, LoraLinearKernel};
