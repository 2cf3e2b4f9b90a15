//! (IA)³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning") for burn-peft, compatible with Hugging Face PEFT: learned vectors that
//! rescale the outputs of the targeted layers, or the inputs of the feedforward ones.
//!
//! Linking this crate registers the `IA3` method with `peft-core`.

#![warn(missing_docs)]

mod config;
mod kernel;

pub use config::Ia3Config;
pub use kernel::Ia3Kernel;
