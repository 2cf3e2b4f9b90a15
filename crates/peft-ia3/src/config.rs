//! [`Ia3Config`]: PEFT's `IA3Config`, same field names, defaults and JSON.

use std::sync::Arc;

use burn::tensor::{Distribution, Tensor};
use peft_core::nn::WeightLayout;
use peft_core::{
    AdapterState, MethodSummary, PeftConfigBase, PeftError, PeftMethod, Result, SiteInfo, SiteKind,
    TargetModules, TargetSpec, TensorRole,
};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::kernel::{IA3_KEY, Ia3Kernel};

fn default_true() -> bool {
    true
}

/// (IA)³ as Hugging Face PEFT defines it: at each targeted linear layer a learned vector `l`
/// rescales the output, `y = (x W + b) ⊙ l`, or, for the layers named by `feedforward_modules`,
/// the input, `y = (x ⊙ l) W + b`. `l` starts at ones (`init_ia3_weights`), so a fresh adapter
/// is a no-op. Merging folds `l` into `W` (and into `b` for output scaling).
///
/// Field names, defaults and JSON are PEFT's (`peft/tuners/ia3/config.py`), so a PEFT
/// `adapter_config.json` deserializes into this type and ours loads in PEFT. PEFT's `IA3Config`
/// has no option we leave unimplemented.
///
/// Build one with [`Ia3Config::new`] and its chainable setters, or with the public fields
/// (`Ia3Config { target_modules: .., ..Default::default() }`):
///
/// ```
/// use peft_ia3::Ia3Config;
/// let config = Ia3Config::new()
///     .targets(["key", "value", "output.dense"])
///     .feedforward(["output.dense"]);
/// assert!(config.is_feedforward("encoder.layer.0.output.dense").unwrap());
/// assert!(!config.is_feedforward("encoder.layer.0.attention.self.key").unwrap());
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Ia3Config {
    /// Modules to adapt: names (exact or dot-bounded suffix), a full-match regex, or
    /// `"all-linear"`.
    pub target_modules: Option<TargetModules>,
    /// Modules never to adapt (same forms as `target_modules`).
    pub exclude_modules: Option<TargetModules>,
    /// Targets that scale their input instead of their output: a full-match regex, or names
    /// matched as a plain suffix of the module path (no dot boundary, as PEFT's
    /// `IA3Model._check_target_module_feedforward`). Must be a subset of a `target_modules` list.
    pub feedforward_modules: Option<TargetModules>,
    /// The base layer stores `[in, out]` (GPT-2 `Conv1D`). Only the file layout depends on it.
    pub fan_in_fan_out: bool,
    /// Modules that get a trainable, saved copy (a classifier head, ...).
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: `l` starts at ones (a no-op); `false`: `l ~ N(0, 1)` (PEFT's `torch.randn`).
    #[serde(default = "default_true")]
    pub init_ia3_weights: bool,
    /// PEFT's common fields (`task_type`, `base_model_name_or_path`, `revision`,
    /// `inference_mode`, ...), flattened into the top level of the JSON.
    #[serde(flatten)]
    pub base: PeftConfigBase,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Self {
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            fan_in_fan_out: false,
            modules_to_save: None,
            init_ia3_weights: true,
            base: PeftConfigBase::default(),
        }
    }
}

/// Compile a `feedforward_modules` regex so it must match the whole path (`re.fullmatch`).
fn full_match(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        PeftError::invalid_config(
            "feedforward_modules",
            format!("`{pattern}` is not a valid regular expression: {e}"),
        )
    })
}

impl Ia3Config {
    /// A config at PEFT's defaults (no targets: the model's default targets and feed-forward
    /// modules are used, as in PEFT).
    ///
    /// ```
    /// use peft_ia3::Ia3Config;
    /// let config = Ia3Config::new();
    /// assert!(config.target_modules.is_none() && config.init_ia3_weights);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// `target_modules`: a list of names (exact or dot-bounded suffix), or one string, a
    /// full-match regex or `"all-linear"`.
    ///
    /// ```
    /// use peft_ia3::Ia3Config;
    /// let config = Ia3Config::new().targets(["k_proj", "v_proj", "down_proj"]);
    /// assert_eq!(config.target_modules, Some(["k_proj", "v_proj", "down_proj"].into()));
    /// ```
    pub fn targets(mut self, targets: impl Into<TargetModules>) -> Self {
        self.target_modules = Some(targets.into());
        self
    }

    /// `feedforward_modules`: the targets that scale their input instead of their output (a
    /// subset of a `target_modules` list, or a full-match regex); `[]` for none.
    ///
    /// ```
    /// use peft_ia3::Ia3Config;
    /// let config = Ia3Config::new().targets(["k_proj", "down_proj"]).feedforward(["down_proj"]);
    /// assert!(config.is_feedforward("model.layers.0.mlp.down_proj").unwrap());
    /// ```
    pub fn feedforward(mut self, modules: impl Into<TargetModules>) -> Self {
        self.feedforward_modules = Some(modules.into());
        self
    }

    /// `exclude_modules`: modules never to adapt (same forms as [`targets`](Self::targets)).
    ///
    /// ```
    /// use peft_ia3::Ia3Config;
    /// let config = Ia3Config::new().targets("all-linear").exclude(["lm_head"]);
    /// assert_eq!(config.exclude_modules, Some(["lm_head"].into()));
    /// ```
    pub fn exclude(mut self, modules: impl Into<TargetModules>) -> Self {
        self.exclude_modules = Some(modules.into());
        self
    }

    /// `modules_to_save`: modules that get a trainable, saved copy (a classifier head).
    ///
    /// ```
    /// use peft_ia3::Ia3Config;
    /// let config = Ia3Config::new().modules_to_save(["classifier"]);
    /// assert_eq!(config.modules_to_save, Some(vec!["classifier".to_string()]));
    /// ```
    pub fn modules_to_save<S: Into<String>>(
        mut self,
        modules: impl IntoIterator<Item = S>,
    ) -> Self {
        self.modules_to_save = Some(modules.into_iter().map(Into::into).collect());
        self
    }

    /// `init_ia3_weights`: `true` (PEFT's default) starts `l` at ones, a no-op; `false` draws it
    /// from `N(0, 1)`.
    ///
    /// ```
    /// use peft_ia3::Ia3Config;
    /// assert!(!Ia3Config::new().init(false).init_ia3_weights);
    /// ```
    pub fn init(mut self, ones: bool) -> Self {
        self.init_ia3_weights = ones;
        self
    }

    /// `task_type` (`"CAUSAL_LM"`, `"SEQ_CLS"`, ...).
    ///
    /// ```
    /// use peft_ia3::Ia3Config;
    /// let config = Ia3Config::new().task_type("SEQ_CLS");
    /// assert_eq!(config.base.task_type.as_deref(), Some("SEQ_CLS"));
    /// ```
    pub fn task_type(mut self, task_type: impl Into<String>) -> Self {
        self.base.task_type = Some(task_type.into());
        self
    }

    /// Whether the module at `path` scales its input (PEFT's
    /// `_check_target_module_feedforward`: a string is `re.fullmatch`ed, list entries are plain
    /// suffixes, so `"dense"` also names `output.xdense`).
    pub fn is_feedforward(&self, path: &str) -> Result<bool> {
        Ok(match &self.feedforward_modules {
            None => false,
            Some(TargetModules::Regex(pattern)) => full_match(pattern)?.is_match(path),
            Some(TargetModules::List(names)) => names.iter().any(|n| path.ends_with(n.as_str())),
        })
    }
}

#[typetag::serde(name = "IA3")]
impl PeftMethod for Ia3Config {
    fn targets(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            ..Default::default()
        }
    }

    fn modules_to_save(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    fn task_type(&self) -> Option<&str> {
        self.base.task_type.as_deref()
    }

    fn with_default_targets(
        &self,
        defaults: &dyn Fn(&str) -> Option<peft_core::DefaultTargets>,
    ) -> Option<Box<dyn PeftMethod>> {
        if self.target_modules.is_some() && self.feedforward_modules.is_some() {
            return None;
        }
        // PEFT's `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` and
        // `..._FEEDFORWARD_MODULES_MAPPING`, each filled only where the config has none
        // (`IA3Model._prepare_adapter_config`).
        let found = defaults("IA3")?;
        Some(Box::new(Self {
            target_modules: self
                .target_modules
                .clone()
                .or(Some(TargetModules::List(found.target_modules))),
            feedforward_modules: self
                .feedforward_modules
                .clone()
                .or(Some(TargetModules::List(found.feedforward_modules))),
            ..self.clone()
        }))
    }

    fn inference_mode(&self) -> bool {
        self.base.inference_mode
    }

    fn reads_base_weights(&self) -> bool {
        false
    }

    fn resolve(&self, _sites: &[SiteInfo]) -> Result<Option<Box<dyn PeftMethod>>> {
        // PEFT raises "Please specify `feedforward_modules`" when neither the config nor the
        // model type's defaults name them.
        if self.feedforward_modules.is_none() {
            return Err(PeftError::invalid_config(
                "feedforward_modules",
                "missing, and PEFT has no default `feedforward_modules` for this model type; name \
                 the targets that scale their input (e.g. [\"down_proj\"]), or [] for none",
            ));
        }
        Ok(None)
    }

    fn validate(&self) -> Result<()> {
        match &self.feedforward_modules {
            None => {}
            Some(TargetModules::Regex(pattern)) => {
                full_match(pattern)?;
            }
            Some(TargetModules::List(ff)) => {
                // PEFT's IA3Config.__post_init__ checks this for two lists.
                if let Some(TargetModules::List(targets)) = &self.target_modules
                    && let Some(extra) = ff.iter().find(|f| !targets.contains(f))
                {
                    return Err(PeftError::invalid_config(
                        "feedforward_modules",
                        format!(
                            "`{extra}` is not in target_modules: feedforward_modules must be a \
                             subset of target_modules"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn supports(&self, kind: &SiteKind) -> bool {
        matches!(kind, SiteKind::Linear { .. })
    }

    fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState> {
        let SiteKind::Linear {
            d_input,
            d_output,
            layout,
            ..
        } = site.kind
        else {
            return Err(PeftError::UnsupportedSite {
                path: site.path.clone(),
                kind: site.kind.name().into(),
                method: "IA3".into(),
            });
        };
        if (layout == WeightLayout::Conv1D) != self.fan_in_fan_out {
            log::warn!(
                "`{}`: fan_in_fan_out = {} but the layer is stored as {:?}; the layer's layout is used (PEFT corrects this the same way)",
                site.path,
                self.fan_in_fan_out,
                layout
            );
        }
        let feedforward = self.is_feedforward(&site.path)?;
        let n = if feedforward { d_input } else { d_output };
        let l = if self.init_ia3_weights {
            Tensor::<1>::ones([n], &site.device)
        } else {
            Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &site.device)
        };
        Ok(AdapterState::new(
            name,
            vec![],
            vec![l],
            Arc::new(Ia3Kernel { feedforward }),
        ))
    }

    fn describe(&self) -> MethodSummary {
        MethodSummary::from_config(
            self,
            &[
                "task_type",
                "base_model_name_or_path",
                "target_modules",
                "exclude_modules",
                "feedforward_modules",
                "init_ia3_weights",
                "modules_to_save",
            ],
            vec![TensorRole::new(
                IA3_KEY,
                "IA3 scale l: [out, 1] scales outputs, [1, in] scales inputs (feedforward)",
            )],
        )
    }

    fn clone_method(&self) -> Box<dyn PeftMethod> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(targets: TargetModules, ff: Option<TargetModules>) -> Ia3Config {
        Ia3Config {
            target_modules: Some(targets),
            feedforward_modules: ff,
            ..Default::default()
        }
    }

    #[test]
    fn feedforward_lists_match_plain_suffixes_and_strings_fullmatch() {
        let list = config(["c_proj"].into(), Some(["c_proj"].into()));
        assert!(list.is_feedforward("transformer.h.0.mlp.c_proj").unwrap());
        assert!(list.is_feedforward("transformer.h.0.mlp.xc_proj").unwrap());
        let regex = config(".*_proj".into(), Some(".*mlp\\.c_proj".into()));
        assert!(regex.is_feedforward("transformer.h.0.mlp.c_proj").unwrap());
        assert!(!regex.is_feedforward("transformer.h.0.attn.c_proj").unwrap());
        assert!(
            !regex
                .is_feedforward("transformer.h.0.mlp.c_proj.x")
                .unwrap()
        );
    }

    #[test]
    fn validate_refuses_what_peft_refuses_or_guesses() {
        // Missing feedforward modules are filled from the model's defaults at injection; a
        // model without defaults makes them an error there.
        let missing = config(["k_proj"].into(), None);
        assert!(missing.validate().is_ok());
        let err = missing.resolve(&[]).unwrap_err().to_string();
        assert!(
            err.contains("feedforward_modules") && err.contains("down_proj"),
            "{err}"
        );
        let not_subset = config(["k_proj"].into(), Some(["down_proj"].into()));
        let err = not_subset.validate().unwrap_err().to_string();
        assert!(err.contains("subset"), "{err}");
        let bad_regex = config(["k_proj"].into(), Some("(".into()));
        assert!(bad_regex.validate().is_err());
        assert!(
            config(["k_proj"].into(), Some(TargetModules::List(vec![])))
                .validate()
                .is_ok()
        );
        assert!(Ia3Config::default().validate().is_ok());
    }

    #[test]
    fn missing_targets_take_the_model_defaults_one_field_at_a_time() {
        let defaults = |table: &str| {
            (table == "IA3").then(|| {
                peft_core::DefaultTargets::new(&["k_proj", "v_proj", "down_proj"], &["down_proj"])
            })
        };
        let filled = Ia3Config::default()
            .with_default_targets(&defaults)
            .unwrap();
        let json = serde_json::to_value(&filled).unwrap();
        assert_eq!(
            json["target_modules"],
            serde_json::json!(["k_proj", "v_proj", "down_proj"])
        );
        assert_eq!(
            json["feedforward_modules"],
            serde_json::json!(["down_proj"])
        );
        // A field the config names is kept.
        let own = config(["q_proj", "down_proj"].into(), None);
        let json = serde_json::to_value(own.with_default_targets(&defaults).unwrap()).unwrap();
        assert_eq!(
            json["target_modules"],
            serde_json::json!(["q_proj", "down_proj"])
        );
        assert!(own.with_default_targets(&|_| None).is_none());
        let complete = config(["q_proj"].into(), Some(TargetModules::List(vec![])));
        assert!(complete.with_default_targets(&defaults).is_none());
    }
}
