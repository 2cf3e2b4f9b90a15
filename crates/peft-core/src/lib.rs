//! Core seams of burn-peft: the [`PeftMethod`] plugin trait, PEFT's target matching,
//! adapter-aware layers ([`nn::Linear`], [`nn::Embedding`]), [`Adaptable`] models,
//! [`PeftModel`] and bundle I/O in Hugging Face PEFT's format, and
//! [`burn_modules::PeftModule`] for plain Burn models (adapters in weight space); both share one
//! adapter registry and one set of switch, merge, save and load rules. PEFT's entry points are
//! [`get_peft_model`] and `from_pretrained` on either wrapper.

#![warn(missing_docs)]

// Lets `#[derive(Adaptable)]` refer to `::peft_core` from inside this crate too.
extern crate self as peft_core;

mod adaptable;
mod adapter;
pub mod atomic;
mod base_config;
pub mod bundle;
pub mod burn_modules;
mod combine;
mod describe;
mod error;
pub mod matching;
mod method;
pub mod nn;
mod peft_model;
pub mod precision;
mod registry;
pub mod unsupported;

pub use adaptable::{Adaptable, DefaultTargets, Site, SiteMut, SitePath, SiteSummary, list_sites};
pub use adapter::{
    AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, TensorSource, WeightSpace,
};
pub use base_config::PeftConfigBase;
pub use combine::{
    Combination, CombinationType, CombineInput, CombineOptions, CombinedTensors,
    MajoritySignMethod, SVD_DRIVERS, SiteCombiner, SiteInput,
};
pub use describe::{MethodSummary, TensorRole};
pub use error::{PeftError, Result};
pub use matching::{LayerIndices, LayersPattern, TargetModules, TargetSpec};
pub use method::{BiasMode, PeftMethod, SiteInfo, SiteKind, peft_type_of};
pub use peft_derive::Adaptable;
pub use peft_model::{
    InjectionReport, LoadReport, PeftModel, TrainableReport, get_peft_model, thousands,
};
/// The factors an additive low-rank kernel hands a mixed-adapter batch
/// ([`AdapterKernel::low_rank`]).
pub use peft_ops::LowRank;

/// Re-exports for method crates (`typetag` registration).
#[doc(hidden)]
pub mod __private {
    pub use typetag;
}
