//! The plugin seam: [`PeftMethod`], the serializable config of an adaptation method.

use std::fmt::Debug;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::adapter::AdapterState;
use crate::error::Result;
use crate::matching::TargetSpec;
use crate::nn::WeightLayout;

/// Which base biases train alongside an adapter (PEFT's `bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasMode {
    /// No bias trains.
    #[default]
    None,
    /// Every bias of the model trains.
    All,
    /// The biases of the adapted layers train.
    LoraOnly,
}

/// What a site looks like, handed to a method when it builds an adapter.
#[derive(Debug, Clone)]
pub struct SiteInfo {
    /// Hugging Face module path.
    pub path: String,
    /// Kind and shape.
    pub kind: SiteKind,
    /// The device of the base weights; adapters live on the same one.
    pub device: Device,
}

/// Kind and shape of a site.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SiteKind {
    /// A linear projection.
    Linear {
        /// Input features.
        d_input: usize,
        /// Output features.
        d_output: usize,
        /// Whether the layer has a bias.
        bias: bool,
        /// File layout of the weight.
        layout: WeightLayout,
    },
    /// An embedding table.
    Embedding {
        /// Number of rows.
        n_embedding: usize,
        /// Row size.
        d_model: usize,
    },
}

impl SiteKind {
    /// A short human name (`Linear`, `Embedding`).
    pub fn name(&self) -> &'static str {
        match self {
            SiteKind::Linear { .. } => "Linear",
            SiteKind::Embedding { .. } => "Embedding",
        }
    }
}

/// A parameter-efficient fine-tuning method: a serializable config that selects sites and
/// builds the adapter state for each.
///
/// Implementations register with `#[typetag::serde(name = "PEFT_TYPE")]`, the same name PEFT
/// writes in `adapter_config.json` (`LORA`, `PREFIX_TUNING`); a method defined in any crate that
/// is linked into the program then loads, saves and trains through the same API with no change
/// to this crate.
#[typetag::serde(tag = "peft_type")]
pub trait PeftMethod: Debug + Send + Sync {
    /// Which modules to adapt.
    fn targets(&self) -> TargetSpec;

    /// `modules_to_save`: modules that get a trainable, saved copy.
    fn modules_to_save(&self) -> Vec<String> {
        Vec::new()
    }

    /// Which base biases train.
    fn bias(&self) -> BiasMode {
        BiasMode::None
    }

    /// Reject options this implementation does not support with
    /// [`PeftError::Unsupported`](crate::PeftError::Unsupported), and invalid values with
    /// [`PeftError::InvalidConfig`](crate::PeftError::InvalidConfig).
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the method can adapt a site of this kind. Targets of other kinds are errors.
    fn supports(&self, kind: &SiteKind) -> bool;

    /// Build the adapter named `name` for `site`, freshly initialized.
    fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState>;

    /// Whether the adapter can be folded into the base weights.
    fn mergeable(&self) -> bool {
        true
    }

    /// A boxed copy.
    fn clone_method(&self) -> Box<dyn PeftMethod>;
}

impl Clone for Box<dyn PeftMethod> {
    fn clone(&self) -> Self {
        self.clone_method()
    }
}

/// The `peft_type` of `method` (its typetag name).
pub fn peft_type_of(method: &dyn PeftMethod) -> &'static str {
    method.typetag_name()
}
