//! Prefix tuning (Li & Liang, 2021; P-tuning v2) for burn-peft, compatible with Hugging Face
//! PEFT: learned keys and values prepended in every attention layer.
//!
//! Linking this crate registers the `PREFIX_TUNING` method with `peft-core`.

#![warn(missing_docs)]

mod config;
mod kernel;

pub use config::PrefixTuningConfig;
pub use kernel::PrefixKernel;
