//! [`LoraConfig`]: PEFT's `LoraConfig`, same field names, defaults and JSON.

use std::sync::Arc;

use burn::tensor::{Distribution, Tensor};
use indexmap::IndexMap;
use peft_core::matching::pattern_lookup;
use peft_core::unsupported::{UnsupportedOption, UnsupportedOptions, UnsupportedTable};
use peft_core::{
    AdapterState, BiasMode, Combination, CombineInput, CombineOptions, LayerIndices, LayersPattern,
    MethodSummary, PeftConfigBase, PeftError, PeftMethod, Result, SiteInfo, SiteKind,
    TargetModules, TargetSpec,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::conv::{self, ConvShape, DoraConv2dKernel, LoraConv2dKernel};
use crate::dora::{DoraEmbeddingKernel, DoraLinearKernel};
use crate::kernel::{LoraEmbeddingKernel, LoraLinearKernel};

/// `init_lora_weights`: `true` (Kaiming-uniform A, zero B), `"gaussian"` (normal A with std
/// `1/r`, zero B) or `false` (both random: the adapter is not a no-op at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitLoraWeights {
    /// `true` / `false`.
    Bool(bool),
    /// A named scheme; only `"gaussian"` is supported.
    Named(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

impl From<bool> for InitLoraWeights {
    fn from(value: bool) -> Self {
        InitLoraWeights::Bool(value)
    }
}

impl From<&str> for InitLoraWeights {
    fn from(value: &str) -> Self {
        InitLoraWeights::Named(value.to_string())
    }
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Bool(b) => s.serialize_bool(*b),
            InitLoraWeights::Named(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(b) => Ok(InitLoraWeights::Bool(b)),
            Value::String(s) => Ok(InitLoraWeights::Named(s)),
            other => Err(serde::de::Error::custom(format!(
                "init_lora_weights must be true, false or a scheme name such as \"gaussian\", found {other}"
            ))),
        }
    }
}

/// Serialize a float that holds an integer as an integer, as PEFT writes `lora_alpha`.
fn int_if_integral<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn alpha_map<S: Serializer>(
    m: &IndexMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            map.serialize_entry(k, &(*v as i64))?;
        } else {
            map.serialize_entry(k, v)?;
        }
    }
    map.end()
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}

/// The options of PEFT's `LoraConfig` (`peft/tuners/lora/config.py`, PEFT 0.21) that burn-peft
/// carries without implementing: the refused ones change the math (or the set of adapted
/// tensors), so a file that sets one is refused by name; the inert ones are only read together
/// with a refused option (or an `init_lora_weights` scheme that is refused itself).
pub struct LoraUnsupported;

impl UnsupportedTable for LoraUnsupported {
    const METHOD: &'static str = "LoRA";
    // Refused first, in the order `validate` has always reported them.
    const OPTIONS: &'static [UnsupportedOption] = &[
        UnsupportedOption::refused("lora_bias", "false", "adds a bias to lora_B"),
        UnsupportedOption::refused("target_parameters", "null", "LoRA on raw parameters"),
        UnsupportedOption::refused("layer_replication", "null", "duplicates base layers"),
        UnsupportedOption::refused("use_qalora", "false", "quantization-aware LoRA"),
        UnsupportedOption::refused(
            "trainable_token_indices",
            "null",
            "trains selected embedding rows",
        ),
        UnsupportedOption::refused(
            "alora_invocation_tokens",
            "null",
            "activated LoRA changes which tokens are adapted",
        ),
        UnsupportedOption::refused("arrow_config", "null", "Arrow routing between adapters"),
        UnsupportedOption::refused("megatron_config", "null", "Megatron parallel layers"),
        UnsupportedOption::refused(
            "ensure_weight_tying",
            "false",
            "ties adapters of tied embeddings",
        ),
        UnsupportedOption::refused("kasa_config", "null", "KaSA adapters"),
        UnsupportedOption::refused("lora_ga_config", "null", "LoRA-GA initialization"),
        UnsupportedOption::refused("monteclora_config", "null", "MonteCLoRA"),
        UnsupportedOption::refused("use_bdlora", "null", "block-diagonal LoRA"),
        UnsupportedOption::refused("velora_config", "null", "VeLoRA"),
        UnsupportedOption::refused("loftq_config", "{}", "LoftQ initialization"),
        // PEFT reads these only with `init_lora_weights = "eva"` / `"corda"` (refused by
        // `validate`), `megatron_config` and `use_qalora` respectively.
        UnsupportedOption::inert("eva_config", "null", "EVA initialization settings"),
        UnsupportedOption::inert("corda_config", "null", "CorDA initialization settings"),
        UnsupportedOption::inert(
            "megatron_core",
            "\"megatron.core\"",
            "the Megatron module to import",
        ),
        UnsupportedOption::inert("qalora_group_size", "16", "QA-LoRA's pooling group size"),
    ];
}

/// LoRA (Hu et al., 2021) as Hugging Face PEFT defines it: `y = W x + B A dropout(x) · s`, with
/// `s = lora_alpha / r` (or `lora_alpha / sqrt(r)` with `use_rslora`); with `use_dora`, DoRA's
/// weight decomposition on top (see [`DoraLinearKernel`]).
///
/// Field names, defaults and JSON are PEFT's, so a PEFT `adapter_config.json` deserializes into
/// this type and ours loads in PEFT. The PEFT options we do not implement (`lora_bias`,
/// `target_parameters`, `use_qalora`, ...) live in one field, [`unsupported`](Self::unsupported):
/// they round trip, and [`PeftMethod::validate`] refuses one that is set.
///
/// Build one with [`LoraConfig::new`] and its chainable setters, or with the public fields:
///
/// ```
/// use peft_lora::LoraConfig;
/// let config = LoraConfig::new(8).alpha(16.0).targets(["query", "value"]);
/// assert_eq!(config.scaling_for(8, 16.0), 2.0);
/// let same = LoraConfig { r: 8, lora_alpha: 16.0, target_modules: Some(["query", "value"].into()), ..Default::default() };
/// assert_eq!(serde_json::to_value(&config).unwrap(), serde_json::to_value(&same).unwrap());
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator.
    #[serde(default = "default_alpha", serialize_with = "int_if_integral")]
    pub lora_alpha: f64,
    /// Dropout on the adapter input (training only).
    pub lora_dropout: f64,
    /// Modules to adapt: names (exact or dot-bounded suffix), a full-match regex, or
    /// `"all-linear"`.
    pub target_modules: Option<TargetModules>,
    /// Modules never to adapt (same forms as `target_modules`).
    pub exclude_modules: Option<TargetModules>,
    /// The base layer stores `[in, out]` (GPT-2 `Conv1D`). Only the file layout depends on it.
    pub fan_in_fan_out: bool,
    /// Which base biases train: `none`, `all` or `lora_only`.
    pub bias: BiasMode,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Modules that get a trainable, saved copy (a classifier head, ...).
    pub modules_to_save: Option<Vec<String>>,
    /// Initialization of A and B.
    pub init_lora_weights: InitLoraWeights,
    /// Only adapt these layer indices.
    pub layers_to_transform: Option<LayerIndices>,
    /// Name of the layer container whose index `layers_to_transform` selects.
    pub layers_pattern: Option<LayersPattern>,
    /// Per-module rank: regex keys matched against the module path's tail; first match wins.
    pub rank_pattern: IndexMap<String, usize>,
    /// Per-module alpha, matched like `rank_pattern`.
    #[serde(serialize_with = "alpha_map")]
    pub alpha_pattern: IndexMap<String, f64>,
    /// PEFT's common fields (`task_type`, `base_model_name_or_path`, `revision`,
    /// `inference_mode`, ...), flattened into the top level of the JSON.
    #[serde(flatten)]
    pub base: PeftConfigBase,

    /// DoRA: a learned magnitude per output feature rescales `W + ΔW` by its detached column
    /// norm (`lora_magnitude_vector` in the bundle).
    pub use_dora: bool,
    /// The PEFT options we carry without implementing them (`lora_bias`, `use_qalora`,
    /// `target_parameters`, ... : [`LoraUnsupported`]), flattened into the top level of the
    /// JSON with PEFT's defaults; [`PeftMethod::validate`] refuses one that is set.
    #[serde(flatten)]
    pub unsupported: UnsupportedOptions<LoraUnsupported>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::default(),
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: IndexMap::new(),
            alpha_pattern: IndexMap::new(),
            base: PeftConfigBase::default(),
            use_dora: false,
            unsupported: UnsupportedOptions::default(),
        }
    }
}

/// A LoRA bundle's ranks against its config, before anything is allocated: no module may get
/// a larger rank from `r` / `rank_pattern` than its A tensor in the file has, and no rank of
/// the config may exceed the largest rank the file holds (it would size modules the file has
/// no tensors for: `"r": 1099511627776` with `all-linear` allocated terabytes). A smaller rank
/// is left to the load, which names the tensor whose shape differs.
#[typetag::deserialize(name = "LORA")]
impl peft_core::bundle::BundleShapes for LoraConfig {
    fn check_shapes(&self, shapes: &std::collections::BTreeMap<String, Vec<usize>>) -> Result<()> {
        let ranks: Vec<(String, usize)> = self
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut largest: Option<usize> = None;
        for (key, shape) in shapes {
            let Some(module) = ["lora_A.weight", "lora_embedding_A"]
                .iter()
                .find_map(|role| key.strip_suffix(role)?.strip_suffix('.'))
            else {
                continue;
            };
            let path = module
                .strip_prefix(peft_core::bundle::KEY_PREFIX)
                .unwrap_or(module);
            let Some(&found) = shape.first() else {
                continue;
            };
            largest = largest.max(Some(found));
            let (expected, _) = self.rank_and_alpha(path)?;
            // A smaller rank than the file's allocates less than the file holds: the load then
            // reports the shape mismatch itself. A larger one is what the file cannot back.
            if expected > found {
                let from_pattern = pattern_lookup("rank_pattern", &ranks, path)?.is_some();
                return Err(PeftError::invalid_config(
                    if from_pattern { "rank_pattern" } else { "r" },
                    format!(
                        "gives `{path}` rank {expected}, but its A tensor in the weights file \
                         has rank {found} (`{key}` {shape:?}): the file cannot back the rank \
                         the config asks for"
                    ),
                ));
            }
        }
        let Some(bound) = largest else {
            return Err(PeftError::invalid_config(
                "r",
                format!(
                    "is {}, but the weights file holds no LoRA A tensor (`lora_A.weight`) to \
                     back any rank: is it a LoRA bundle?",
                    self.r
                ),
            ));
        };
        let unbacked = std::iter::once(("r".to_string(), self.r)).chain(
            self.rank_pattern
                .iter()
                .map(|(k, &v)| (format!("rank_pattern.{k}"), v)),
        );
        for (key, rank) in unbacked {
            if rank > bound {
                return Err(PeftError::invalid_config(
                    key,
                    format!(
                        "is {rank}, but no tensor of the weights file has a rank above {bound}: \
                         the config does not match its weights"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl LoraConfig {
    /// The scaling for a site of rank `r` and alpha `alpha`.
    pub fn scaling_for(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Rank and alpha for the module at `path` (`rank_pattern` / `alpha_pattern`, else global).
    pub fn rank_and_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let ranks: Vec<(String, usize)> = self
            .rank_pattern
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let alphas: Vec<(String, f64)> = self
            .alpha_pattern
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let r = pattern_lookup("rank_pattern", &ranks, path)?
            .copied()
            .unwrap_or(self.r);
        let alpha = pattern_lookup("alpha_pattern", &alphas, path)?
            .copied()
            .unwrap_or(self.lora_alpha);
        Ok((r, alpha))
    }
}

#[typetag::serde(name = "LORA")]
impl PeftMethod for LoraConfig {
    fn targets(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
        }
    }

    fn modules_to_save(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    fn task_type(&self) -> Option<&str> {
        self.base.task_type.as_deref()
    }

    fn bias(&self) -> BiasMode {
        self.bias
    }

    fn validate(&self) -> Result<()> {
        self.unsupported.check()?;
        if self.r == 0 {
            return Err(PeftError::invalid_config(
                "r",
                "the rank must be at least 1",
            ));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(PeftError::invalid_config(
                format!("rank_pattern.{k}"),
                "the rank must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::invalid_config(
                "lora_dropout",
                format!("must be in [0, 1), found {}", self.lora_dropout),
            ));
        }
        if let InitLoraWeights::Named(name) = &self.init_lora_weights
            && name != "gaussian"
        {
            return Err(PeftError::unsupported(
                "init_lora_weights",
                format!("\"{name}\""),
                "only true, false and \"gaussian\" are implemented",
            ));
        }
        Ok(())
    }

    fn with_default_targets(
        &self,
        defaults: &dyn Fn(&str) -> Option<peft_core::DefaultTargets>,
    ) -> Option<Box<dyn PeftMethod>> {
        if self.target_modules.is_some() {
            return None;
        }
        // PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` (DoRA uses it too).
        let found = defaults("LORA")?;
        Some(Box::new(Self {
            target_modules: Some(TargetModules::List(found.target_modules)),
            ..self.clone()
        }))
    }

    fn inference_mode(&self) -> bool {
        self.base.inference_mode
    }

    fn reads_base_weights(&self) -> bool {
        // DoRA's magnitude starts at the column norms of W; plain LoRA never reads it.
        self.use_dora
    }

    fn supports(&self, kind: &SiteKind) -> bool {
        matches!(
            kind,
            SiteKind::Linear { .. }
                | SiteKind::Embedding { .. }
                | SiteKind::Conv1d { .. }
                | SiteKind::Conv2d { .. }
        )
    }

    fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState> {
        let (r, alpha) = self.rank_and_alpha(&site.path)?;
        let scaling = self.scaling_for(r, alpha);
        let device = &site.device;
        match site.kind {
            SiteKind::Linear {
                d_input, layout, ..
            } => {
                if (layout == peft_core::nn::WeightLayout::Conv1D) != self.fan_in_fan_out {
                    log::warn!(
                        "`{}`: fan_in_fan_out = {} but the layer is stored as {:?}; the layer's layout is used (PEFT corrects this the same way)",
                        site.path,
                        self.fan_in_fan_out,
                        layout
                    );
                }
                let SiteKind::Linear { d_output, .. } = site.kind else {
                    unreachable!()
                };
                let bound_a = 1.0 / (d_input as f64).sqrt();
                let a = match &self.init_lora_weights {
                    InitLoraWeights::Named(_) => Tensor::<2>::random(
                        [d_input, r],
                        Distribution::Normal(0.0, 1.0 / r as f64),
                        device,
                    ),
                    _ => Tensor::<2>::random(
                        [d_input, r],
                        Distribution::Uniform(-bound_a, bound_a),
                        device,
                    ),
                };
                let b = match &self.init_lora_weights {
                    InitLoraWeights::Bool(false) => {
                        let bound_b = 1.0 / (r as f64).sqrt();
                        Tensor::<2>::random(
                            [r, d_output],
                            Distribution::Uniform(-bound_b, bound_b),
                            device,
                        )
                    }
                    _ => Tensor::<2>::zeros([r, d_output], device),
                };
                let kernel = LoraLinearKernel {
                    scaling,
                    dropout: self.lora_dropout,
                    r,
                };
                if self.use_dora {
                    return DoraLinearKernel { lora: kernel }.adapter(name, site, a, b);
                }
                Ok(AdapterState::new(
                    name,
                    vec![a, b],
                    vec![],
                    Arc::new(kernel),
                ))
            }
            SiteKind::Embedding {
                n_embedding,
                d_model,
            } => {
                let (a, b) = match &self.init_lora_weights {
                    InitLoraWeights::Bool(false) => (
                        Tensor::<2>::random(
                            [n_embedding, r],
                            Distribution::Normal(0.0, 1.0),
                            device,
                        ),
                        Tensor::<2>::random([r, d_model], Distribution::Normal(0.0, 1.0), device),
                    ),
                    _ => (
                        Tensor::<2>::zeros([n_embedding, r], device),
                        Tensor::<2>::random([r, d_model], Distribution::Normal(0.0, 1.0), device),
                    ),
                };
                let kernel = LoraEmbeddingKernel { scaling };
                if self.use_dora {
                    return DoraEmbeddingKernel { lora: kernel }.adapter(name, site, a, b);
                }
                Ok(AdapterState::new(
                    name,
                    vec![a, b],
                    vec![],
                    Arc::new(kernel),
                ))
            }
            SiteKind::Conv1d {
                in_channels,
                out_channels,
                kernel_size,
                geometry,
                ..
            }
            | SiteKind::Conv2d {
                in_channels,
                out_channels,
                kernel_size,
                geometry,
                ..
            } => {
                let shape = ConvShape {
                    in_channels,
                    out_channels,
                    kernel_size,
                    geometry,
                    one_d: matches!(site.kind, SiteKind::Conv1d { .. }),
                };
                conv::check_site(site, &shape, r, self.use_dora)?;
                let gaussian = matches!(self.init_lora_weights, InitLoraWeights::Named(_));
                let zero_b = !matches!(self.init_lora_weights, InitLoraWeights::Bool(false));
                let (a, b) = conv::fresh_tensors(&shape, r, gaussian, zero_b, device);
                let kernel = LoraConv2dKernel {
                    lora: LoraLinearKernel {
                        scaling,
                        dropout: self.lora_dropout,
                        r,
                    },
                    shape,
                };
                if self.use_dora {
                    return DoraConv2dKernel { lora: kernel }.adapter(name, site, a, b);
                }
                Ok(AdapterState::new(
                    name,
                    vec![a, b],
                    vec![],
                    Arc::new(kernel),
                ))
            }
            _ => Err(PeftError::UnsupportedSite {
                path: site.path.clone(),
                kind: site.kind.name().into(),
                method: "LORA".into(),
            }),
        }
    }

    fn describe(&self) -> MethodSummary {
        crate::describe::summary(self)
    }

    /// PEFT's `add_weighted_adapter` rules (see [`crate::combine`]).
    fn combine(
        &self,
        inputs: &[CombineInput<'_>],
        options: &CombineOptions,
    ) -> Result<Combination> {
        crate::combine::plan_combination(inputs, options)
    }

    fn clone_method(&self) -> Box<dyn PeftMethod> {
        Box::new(self.clone())
    }
}
