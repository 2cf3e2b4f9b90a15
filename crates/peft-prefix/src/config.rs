//! [`PrefixTuningConfig`]: PEFT's `PrefixTuningConfig`, same fields and JSON.

use std::sync::Arc;

use burn::tensor::{Distribution, Tensor};
use peft_core::{
    AdapterState, MethodSummary, PeftConfigBase, PeftError, PeftMethod, Result, SiteInfo, SiteKind,
    TargetSpec, TensorRole,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::kernel::PrefixKernel;

/// Prefix tuning as Hugging Face PEFT defines it: `num_virtual_tokens` learned keys and values
/// per attention layer, optionally produced by an MLP (`prefix_projection`).
///
/// `num_layers`, `token_dim`, `num_attention_heads`, `num_transformer_submodules` and
/// `encoder_hidden_size` are derived from the model when absent and written into the saved
/// config as PEFT does (for GQA models, `token_dim` and `num_attention_heads` are the key/value
/// ones).
///
/// PEFT's `PrefixTuningConfig` has no option we leave unimplemented; the values of
/// `num_transformer_submodules` and `init_weights` that we do not implement are refused by
/// [`PeftMethod::validate`].
///
/// Build one with [`PrefixTuningConfig::new`] and its chainable setters, or with the public
/// fields:
///
/// ```
/// use peft_prefix::PrefixTuningConfig;
/// let config = PrefixTuningConfig::new(16).task_type("CAUSAL_LM");
/// assert!(!config.prefix_projection);
/// let same = PrefixTuningConfig { num_virtual_tokens: 16, ..Default::default() }.task_type("CAUSAL_LM");
/// assert_eq!(serde_json::to_value(&config).unwrap(), serde_json::to_value(&same).unwrap());
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefixTuningConfig {
    /// Virtual tokens per layer.
    pub num_virtual_tokens: usize,
    /// Per-layer key (or value) width; derived: `kv_heads · head_dim`.
    pub token_dim: Option<usize>,
    /// Attention layers; derived.
    pub num_layers: Option<usize>,
    /// Key/value heads; derived.
    pub num_attention_heads: Option<usize>,
    /// 1 for decoder-only and encoder-only models; derived.
    pub num_transformer_submodules: Option<usize>,
    /// Hidden size of the projection MLP; defaults to `token_dim`.
    pub encoder_hidden_size: Option<usize>,
    /// Produce the prefix with PEFT's MLP (`Embedding -> Linear -> Tanh -> Linear`).
    pub prefix_projection: bool,
    /// PEFT's `init_weights` (`null`, or `"zero"` to zero the last projection layer).
    pub init_weights: Option<Value>,
    /// Modules that get a trainable, saved copy (a classifier head).
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT's common fields (`task_type`, `base_model_name_or_path`, `revision`,
    /// `inference_mode`, ...), flattened into the top level of the JSON.
    #[serde(flatten)]
    pub base: PeftConfigBase,
}

impl Default for PrefixTuningConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 20,
            token_dim: None,
            num_layers: None,
            num_attention_heads: None,
            num_transformer_submodules: None,
            encoder_hidden_size: None,
            prefix_projection: false,
            init_weights: None,
            modules_to_save: None,
            base: PeftConfigBase::default(),
        }
    }
}

fn mismatch(key: &str, found: usize, model: usize, what: &str) -> PeftError {
    PeftError::invalid_config(
        key,
        format!(
            "is {found} but the model has {model} {what}; the adapter was made for another model"
        ),
    )
}

/// A prefix bundle's sizes against its config, before anything is allocated: the config may
/// not ask for more virtual tokens than `prompt_embeddings` has rows (a config of 2^40 virtual
/// tokens allocated a table that size), and a projection MLP, which the bundle does not hold,
/// may not be wider than the table it produces.
#[typetag::deserialize(name = "PREFIX_TUNING")]
impl peft_core::bundle::BundleShapes for PrefixTuningConfig {
    fn check_shapes(&self, shapes: &std::collections::BTreeMap<String, Vec<usize>>) -> Result<()> {
        let n = self.num_virtual_tokens;
        let [rows, width] = match shapes.get("prompt_embeddings").map(Vec::as_slice) {
            Some(&[rows, width]) => [rows, width],
            found => {
                return Err(PeftError::invalid_config(
                    "num_virtual_tokens",
                    format!(
                        "is {n}, but the weights file holds no `prompt_embeddings` table \
                         [num_virtual_tokens, num_layers·2·token_dim] to back it (found {found:?})"
                    ),
                ));
            }
        };
        // Fewer virtual tokens than rows allocate less than the file holds: the load names the
        // shape mismatch itself (the table's width comes from the model, checked there too).
        if n > rows {
            return Err(PeftError::invalid_config(
                "num_virtual_tokens",
                format!(
                    "is {n}, but `prompt_embeddings` in the weights file has {rows} rows: the \
                     file cannot back the virtual tokens the config asks for"
                ),
            ));
        }
        // The bundle holds only the projection's output; building the projection allocates
        // hidden × width values (its second layer) before the table replaces it. PEFT's default
        // is token_dim (< width); a wider one is taken only while it stays within a budget of
        // MAX_PROJECTION_VALUES, so a crafted config cannot allocate terabytes.
        if self.prefix_projection
            && let Some(hidden) = self.encoder_hidden_size
            && hidden > width
            && hidden
                .checked_mul(width)
                .is_none_or(|values| values > MAX_PROJECTION_VALUES)
        {
            return Err(PeftError::invalid_config(
                "encoder_hidden_size",
                format!(
                    "is {hidden}: the projection would allocate {hidden} × {width} values only to \
                     be replaced by the saved table ({rows} × {width}); at most {width} (the \
                     table's width) or {MAX_PROJECTION_VALUES} values in all are accepted"
                ),
            ));
        }
        Ok(())
    }
}

/// The most values a bundle's prefix projection may allocate beyond its table's width
/// (2^28 f32 values, 1 GiB).
const MAX_PROJECTION_VALUES: usize = 1 << 28;

impl PrefixTuningConfig {
    /// `num_virtual_tokens` learned keys and values per layer, every other field at PEFT's
    /// default (a table, no projection; the sizes are derived from the model).
    ///
    /// ```
    /// use peft_prefix::PrefixTuningConfig;
    /// let config = PrefixTuningConfig::new(8);
    /// assert_eq!(config.num_virtual_tokens, 8);
    /// assert!(config.token_dim.is_none());
    /// ```
    pub fn new(num_virtual_tokens: usize) -> Self {
        Self {
            num_virtual_tokens,
            ..Self::default()
        }
    }

    /// `prefix_projection` with `encoder_hidden_size`: produce the prefix with PEFT's MLP
    /// (`Embedding -> Linear -> Tanh -> Linear`) of this hidden size (`None`: `token_dim`).
    ///
    /// ```
    /// use peft_prefix::PrefixTuningConfig;
    /// let config = PrefixTuningConfig::new(8).projection(Some(64));
    /// assert!(config.prefix_projection);
    /// assert_eq!(config.encoder_hidden_size, Some(64));
    /// ```
    pub fn projection(mut self, hidden_size: Option<usize>) -> Self {
        self.prefix_projection = true;
        self.encoder_hidden_size = hidden_size;
        self
    }

    /// `init_weights = "zero"` (`true`): the projection's last layer starts at zero; `false`
    /// leaves PEFT's default (`null`).
    ///
    /// ```
    /// use peft_prefix::PrefixTuningConfig;
    /// let config = PrefixTuningConfig::new(8).projection(None).zero_init(true);
    /// assert_eq!(config.init_weights, Some(serde_json::json!("zero")));
    /// ```
    pub fn zero_init(mut self, zero: bool) -> Self {
        self.init_weights = zero.then(|| Value::String("zero".into()));
        self
    }

    /// `modules_to_save`: modules that get a trainable, saved copy (a classifier head).
    ///
    /// ```
    /// use peft_prefix::PrefixTuningConfig;
    /// let config = PrefixTuningConfig::new(8).modules_to_save(["classifier"]);
    /// assert_eq!(config.modules_to_save, Some(vec!["classifier".to_string()]));
    /// ```
    pub fn modules_to_save<S: Into<String>>(
        mut self,
        modules: impl IntoIterator<Item = S>,
    ) -> Self {
        self.modules_to_save = Some(modules.into_iter().map(Into::into).collect());
        self
    }

    /// `task_type` (`"CAUSAL_LM"`, `"SEQ_CLS"`, ...).
    ///
    /// ```
    /// use peft_prefix::PrefixTuningConfig;
    /// let config = PrefixTuningConfig::new(8).task_type("CAUSAL_LM");
    /// assert_eq!(config.base.task_type.as_deref(), Some("CAUSAL_LM"));
    /// ```
    pub fn task_type(mut self, task_type: impl Into<String>) -> Self {
        self.base.task_type = Some(task_type.into());
        self
    }

    fn uses_zero_init(&self) -> bool {
        matches!(&self.init_weights, Some(Value::String(s)) if s == "zero")
    }
}

#[typetag::serde(name = "PREFIX_TUNING")]
impl PeftMethod for PrefixTuningConfig {
    fn targets(&self) -> TargetSpec {
        TargetSpec::default()
    }

    fn modules_to_save(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    fn task_type(&self) -> Option<&str> {
        self.base.task_type.as_deref()
    }

    fn validate(&self) -> Result<()> {
        if self.num_virtual_tokens == 0 {
            return Err(PeftError::invalid_config(
                "num_virtual_tokens",
                "must be at least 1",
            ));
        }
        if let Some(n) = self.num_transformer_submodules
            && n != 1
        {
            return Err(PeftError::unsupported(
                "num_transformer_submodules",
                n.to_string(),
                "only encoder-only and decoder-only models (1) are implemented",
            ));
        }
        match &self.init_weights {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "zero" => {}
            Some(other) => {
                return Err(PeftError::unsupported(
                    "init_weights",
                    other.to_string(),
                    "known values: null, \"zero\"",
                ));
            }
        }
        Ok(())
    }

    fn supports(&self, kind: &SiteKind) -> bool {
        matches!(kind, SiteKind::KvPrefix { .. })
    }

    fn adapts_attention_prefix(&self) -> bool {
        true
    }

    fn module_key_prefix(&self) -> &'static str {
        "base_model."
    }

    fn resolve(&self, sites: &[SiteInfo]) -> Result<Option<Box<dyn PeftMethod>>> {
        let Some(SiteKind::KvPrefix {
            num_layers,
            kv_heads,
            head_dim,
            ..
        }) = sites.first().map(|s| &s.kind)
        else {
            return Ok(None);
        };
        let token_dim = kv_heads * head_dim;
        if let Some(n) = self.num_layers.filter(|n| n != num_layers) {
            return Err(mismatch("num_layers", n, *num_layers, "layers"));
        }
        if let Some(d) = self.token_dim.filter(|d| *d != token_dim) {
            return Err(mismatch(
                "token_dim",
                d,
                token_dim,
                "key/value features per layer",
            ));
        }
        if let Some(h) = self.num_attention_heads.filter(|h| h != kv_heads) {
            return Err(mismatch(
                "num_attention_heads",
                h,
                *kv_heads,
                "key/value heads",
            ));
        }
        Ok(Some(Box::new(PrefixTuningConfig {
            num_layers: Some(*num_layers),
            token_dim: Some(token_dim),
            num_attention_heads: Some(*kv_heads),
            num_transformer_submodules: Some(1),
            encoder_hidden_size: Some(self.encoder_hidden_size.unwrap_or(token_dim)),
            ..self.clone()
        })))
    }

    fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState> {
        let SiteKind::KvPrefix {
            num_layers,
            kv_heads,
            head_dim,
            ..
        } = site.kind
        else {
            return Err(PeftError::UnsupportedSite {
                path: site.path.clone(),
                kind: site.kind.name().into(),
                method: "PREFIX_TUNING".into(),
            });
        };
        let device = &site.device;
        let n = self.num_virtual_tokens;
        let token_dim = kv_heads * head_dim;
        let width = num_layers * 2 * token_dim;
        let kernel = PrefixKernel {
            num_virtual_tokens: n,
            num_layers,
            kv_heads,
            head_dim,
            projection: self.prefix_projection,
        };
        // PEFT: nn.Embedding (N(0, 1)) for the table or the MLP input, nn.Linear defaults
        // (U(+-1/sqrt(fan_in))) for the MLP.
        let normal =
            |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), device);
        let uniform = |shape: [usize; 2], fan_in: usize| {
            let b = 1.0 / (fan_in as f64).sqrt();
            Tensor::<2>::random(shape, Distribution::Uniform(-b, b), device)
        };
        let state = if self.prefix_projection {
            let hidden = self.encoder_hidden_size.unwrap_or(token_dim);
            let (w2, b2) = if self.uses_zero_init() {
                (
                    Tensor::zeros([hidden, width], device),
                    Tensor::zeros([width], device),
                )
            } else {
                let b = 1.0 / (hidden as f64).sqrt();
                (
                    uniform([hidden, width], hidden),
                    Tensor::random([width], Distribution::Uniform(-b, b), device),
                )
            };
            let b1 = 1.0 / (token_dim as f64).sqrt();
            AdapterState::new(
                name,
                vec![
                    normal([n, token_dim]),
                    uniform([token_dim, hidden], token_dim),
                    w2,
                ],
                vec![
                    Tensor::random([hidden], Distribution::Uniform(-b1, b1), device),
                    b2,
                ],
                Arc::new(kernel),
            )
        } else {
            AdapterState::new(name, vec![normal([n, width])], vec![], Arc::new(kernel))
        };
        Ok(state)
    }

    fn mergeable(&self) -> bool {
        false
    }

    fn describe(&self) -> MethodSummary {
        MethodSummary::from_config(
            self,
            &[
                "task_type",
                "base_model_name_or_path",
                "modules_to_save",
                "num_virtual_tokens",
                "prefix_projection",
                "encoder_hidden_size",
                "num_layers",
                "token_dim",
                "num_attention_heads",
            ],
            vec![TensorRole::new(
                "prompt_embeddings",
                "prefix keys/values [num_virtual_tokens, num_layers·2·token_dim]",
            )],
        )
    }

    fn inference_mode(&self) -> bool {
        self.base.inference_mode
    }

    fn reads_base_weights(&self) -> bool {
        false
    }

    fn clone_method(&self) -> Box<dyn PeftMethod> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod shape_tests {
    use super::*;
    use peft_core::bundle::BundleShapes;

    /// A projection as wide as the table of a real model (30 layers × 2 × 576) would allocate
    /// 2^40-odd values before the table replaced it: refused; PEFT's default (token_dim) and a
    /// projection within the budget load.
    #[test]
    fn a_projection_beyond_the_budget_is_refused_before_allocation() {
        let (rows, width) = (20usize, 30 * 2 * 576);
        let shapes = [("prompt_embeddings".to_string(), vec![rows, width])].into();
        let config = |hidden| PrefixTuningConfig {
            num_virtual_tokens: rows,
            prefix_projection: true,
            encoder_hidden_size: Some(hidden),
            ..PrefixTuningConfig::default()
        };
        let e = config(rows * width).check_shapes(&shapes).unwrap_err();
        assert!(e.to_string().contains("encoder_hidden_size"), "{e}");
        assert!(config(576).check_shapes(&shapes).is_ok());
        assert!(config(width).check_shapes(&shapes).is_ok());
        // A tiny model may take a projection wider than its table (within the budget).
        let small = [("prompt_embeddings".to_string(), vec![rows, 256])].into();
        assert!(config(1024).check_shapes(&small).is_ok());
    }
}
