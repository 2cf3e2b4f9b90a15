//! The plugin seam: [`PeftMethod`], the serializable config of an adaptation method.

use std::fmt::Debug;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterState, BaseWeights};
use crate::combine::{Combination, CombineInput, CombineOptions};
use crate::describe::MethodSummary;
use crate::error::{PeftError, Result};
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
    /// The site's base weights (Burn layout), for methods whose initialization depends on them
    /// (DoRA's magnitude starts at the column norms); `None` at a key/value prefix site.
    pub base: Option<BaseWeights>,
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
    /// A 1-D convolution (PyTorch's `nn.Conv1d`), described as a 2-D convolution of height 1:
    /// `kernel_size` `[1, k]`, `geometry` with height stride, padding and dilation `1, 0, 1`.
    Conv1d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel size `[1, k]`.
        kernel_size: [usize; 2],
        /// Stride, padding, dilation and groups (height entries `1, 0, 1`).
        geometry: crate::nn::ConvGeometry,
        /// Whether the layer has a bias.
        bias: bool,
    },
    /// A 2-D convolution (PyTorch's `nn.Conv2d`).
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel height and width.
        kernel_size: [usize; 2],
        /// Stride, padding, dilation and groups.
        geometry: crate::nn::ConvGeometry,
        /// Whether the layer has a bias.
        bias: bool,
    },
    /// The attention key/value stream of every layer.
    KvPrefix {
        /// Layers.
        num_layers: usize,
        /// Query heads per layer.
        query_heads: usize,
        /// Key/value heads per layer.
        kv_heads: usize,
        /// Head size.
        head_dim: usize,
        /// Model hidden size.
        hidden_size: usize,
    },
}

impl SiteKind {
    /// A short human name (`Linear`, `Embedding`).
    pub fn name(&self) -> &'static str {
        match self {
            SiteKind::Linear { .. } => "Linear",
            SiteKind::Embedding { .. } => "Embedding",
            SiteKind::Conv1d { .. } => "Conv1d",
            SiteKind::Conv2d { .. } => "Conv2d",
            SiteKind::KvPrefix { .. } => "attention key/value prefix",
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

    /// This config with PEFT's default targets for the model filled in where it names none,
    /// as PEFT's `_prepare_adapter_config` does before injecting: `defaults(table)` gives the
    /// model's entry of PEFT's mapping `table` (`"LORA"`, `"IA3"`, see
    /// [`Adaptable::default_targets`](crate::Adaptable::default_targets)). `None` when nothing
    /// is filled in (the config names its targets, or the model has no defaults: injection then
    /// asks for `target_modules`). The filled config is the one saved, as PEFT saves it.
    fn with_default_targets(
        &self,
        defaults: &dyn Fn(&str) -> Option<crate::DefaultTargets>,
    ) -> Option<Box<dyn PeftMethod>> {
        let _ = defaults;
        None
    }

    /// PEFT's `inference_mode`: a bundle whose config says `true` (PEFT writes it so on every
    /// save) loads frozen unless asked to train, as `PeftModel.from_pretrained(...,
    /// is_trainable=False)`. Methods without the field train what they load.
    fn inference_mode(&self) -> bool {
        false
    }

    /// Whether [`create_adapter`](Self::create_adapter) reads the sites' base weights
    /// ([`SiteInfo::base`]): a quantized base is then dequantized for it. Methods that never do
    /// (LoRA, IA3) return `false` so adding an adapter to a quantized model allocates nothing
    /// dense. The default, `true`, is always correct.
    fn reads_base_weights(&self) -> bool {
        true
    }

    /// `modules_to_save`: modules that get a trainable, saved copy.
    fn modules_to_save(&self) -> Vec<String> {
        Vec::new()
    }

    /// PEFT's `task_type` (`SEQ_CLS`, `CAUSAL_LM`, ...), where the method has one; it decides,
    /// as in PEFT, whether `"all-linear"` leaves out a classification head.
    fn task_type(&self) -> Option<&str> {
        None
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

    /// Whether the method attaches to the model's attention key/value stream (prompt learning)
    /// rather than to modules named by `target_modules`.
    fn adapts_attention_prefix(&self) -> bool {
        false
    }

    /// This config with the values it derives from the model filled in (PEFT writes those into
    /// the saved config, e.g. prefix tuning's `num_layers` and `token_dim`), or `None` when
    /// nothing is derived. `sites` are the sites the method will adapt.
    fn resolve(&self, sites: &[SiteInfo]) -> Result<Option<Box<dyn PeftMethod>>> {
        let _ = sites;
        Ok(None)
    }

    /// Build the adapter named `name` for `site`, freshly initialized.
    fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState>;

    /// The key prefix of `modules_to_save` copies in the bundle: `base_model.model.` for tuners
    /// such as LoRA, `base_model.` for prompt-learning methods (as PEFT writes them).
    fn module_key_prefix(&self) -> &'static str {
        crate::bundle::KEY_PREFIX
    }

    /// Whether the adapter can be folded into the base weights.
    fn mergeable(&self) -> bool {
        true
    }

    /// What tools such as `burn-peft inspect` show about this config: its notable values and
    /// the role of each tensor it saves (see [`MethodSummary::from_config`]). The default shows
    /// nothing.
    fn describe(&self) -> MethodSummary {
        MethodSummary::default()
    }

    /// Plan a weighted combination of adapters (PEFT's `add_weighted_adapter`): called on the
    /// config of the first of `inputs` by
    /// [`PeftModel::add_weighted_adapter`](crate::PeftModel::add_weighted_adapter), which has
    /// already checked the names, weights, options and `modules_to_save` conflicts. Returns the
    /// new adapter's config and the per-site math; rejects inputs it cannot combine with
    /// [`PeftError::IncompatibleAdapters`]. By default a method does not combine.
    fn combine(
        &self,
        inputs: &[CombineInput<'_>],
        options: &CombineOptions,
    ) -> Result<Combination> {
        let _ = options;
        Err(PeftError::NotSupportedByMethod {
            adapter: inputs
                .first()
                .map(|i| i.name.to_string())
                .unwrap_or_default(),
            method: self.typetag_name().into(),
            reason: "weighted combination (add_weighted_adapter) is not implemented by this method"
                .into(),
        })
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
