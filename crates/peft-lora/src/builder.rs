//! Chainable setters for [`LoraConfig`]: `LoraConfig::new(r).alpha(16.0).targets([..])`.
//!
//! Each sets one public field and returns the config, so a builder chain and a struct literal
//! with `..Default::default()` give the same config (and the same `adapter_config.json`).
//!
//! Some setters share a name with a [`PeftMethod`](peft_core::PeftMethod) getter (`targets`,
//! `bias`, `modules_to_save`, `task_type`). On an owned config the setter wins; reach the
//! getter through a reference (`(&config).bias()`) or as `PeftMethod::bias(&config)`.

use indexmap::IndexMap;
use peft_core::{BiasMode, LayerIndices, LayersPattern, TargetModules};

use crate::{InitLoraWeights, LoraConfig};

impl LoraConfig {
    /// A config of rank `r`, every other field at PEFT's default (`lora_alpha` 8, no dropout,
    /// no targets: the model's default targets are used, as in PEFT).
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(16);
    /// assert_eq!((config.r, config.lora_alpha), (16, 8.0));
    /// ```
    pub fn new(r: usize) -> Self {
        Self {
            r,
            ..Self::default()
        }
    }

    /// `lora_alpha`, the scaling numerator (`s = alpha / r`).
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).alpha(32.0);
    /// assert_eq!(config.scaling_for(config.r, config.lora_alpha), 4.0);
    /// ```
    pub fn alpha(mut self, alpha: f64) -> Self {
        self.lora_alpha = alpha;
        self
    }

    /// `lora_dropout` on the adapter input (training only), in `[0, 1)`.
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// assert_eq!(LoraConfig::new(8).dropout(0.1).lora_dropout, 0.1);
    /// ```
    pub fn dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self
    }

    /// `target_modules`: a list of names (exact or dot-bounded suffix), or one string, a
    /// full-match regex or `"all-linear"`.
    ///
    /// ```
    /// use peft_core::TargetModules;
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).targets(["q_proj", "v_proj"]);
    /// assert_eq!(config.target_modules, Some(TargetModules::list(["q_proj", "v_proj"])));
    /// let all = LoraConfig::new(8).targets("all-linear");
    /// assert_eq!(all.target_modules, Some(TargetModules::Regex("all-linear".into())));
    /// ```
    pub fn targets(mut self, targets: impl Into<TargetModules>) -> Self {
        self.target_modules = Some(targets.into());
        self
    }

    /// `exclude_modules`: modules never to adapt (same forms as [`targets`](Self::targets)).
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).targets("all-linear").exclude(["lm_head"]);
    /// assert_eq!(config.exclude_modules, Some(["lm_head"].into()));
    /// ```
    pub fn exclude(mut self, modules: impl Into<TargetModules>) -> Self {
        self.exclude_modules = Some(modules.into());
        self
    }

    /// `use_rslora`: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(16).alpha(8.0).rslora(true);
    /// assert_eq!(config.scaling_for(16, 8.0), 2.0);
    /// ```
    pub fn rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// `use_dora`: DoRA's learned magnitude on top of LoRA.
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// assert!(LoraConfig::new(8).dora(true).use_dora);
    /// ```
    pub fn dora(mut self, on: bool) -> Self {
        self.use_dora = on;
        self
    }

    /// `bias`: which base biases train alongside the adapter.
    ///
    /// ```
    /// use peft_core::BiasMode;
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).bias(BiasMode::LoraOnly);
    /// assert_eq!(config.bias, BiasMode::LoraOnly);
    /// ```
    pub fn bias(mut self, mode: BiasMode) -> Self {
        self.bias = mode;
        self
    }

    /// `modules_to_save`: modules that get a trainable, saved copy (a classifier head).
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).modules_to_save(["classifier"]);
    /// assert_eq!(config.modules_to_save, Some(vec!["classifier".to_string()]));
    /// ```
    pub fn modules_to_save<S: Into<String>>(
        mut self,
        modules: impl IntoIterator<Item = S>,
    ) -> Self {
        self.modules_to_save = Some(modules.into_iter().map(Into::into).collect());
        self
    }

    /// `init_lora_weights`: `true` (PEFT's default), `false` or `"gaussian"`.
    ///
    /// ```
    /// use peft_lora::{InitLoraWeights, LoraConfig};
    /// assert_eq!(LoraConfig::new(8).init(false).init_lora_weights, InitLoraWeights::Bool(false));
    /// assert_eq!(
    ///     LoraConfig::new(8).init("gaussian").init_lora_weights,
    ///     InitLoraWeights::Named("gaussian".into())
    /// );
    /// ```
    pub fn init(mut self, init: impl Into<InitLoraWeights>) -> Self {
        self.init_lora_weights = init.into();
        self
    }

    /// `task_type` (`"CAUSAL_LM"`, `"SEQ_CLS"`, ...), which decides PEFT's default
    /// `modules_to_save` and `all-linear`'s exclusions.
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).task_type("CAUSAL_LM");
    /// assert_eq!(config.base.task_type.as_deref(), Some("CAUSAL_LM"));
    /// ```
    pub fn task_type(mut self, task_type: impl Into<String>) -> Self {
        self.base.task_type = Some(task_type.into());
        self
    }

    /// `layers_to_transform` and `layers_pattern`: adapt only the layers at these indices of
    /// the container named `pattern` (`"layers"`, `"h"`).
    ///
    /// ```
    /// use peft_core::{LayerIndices, LayersPattern};
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).targets(["q_proj"]).layers([0, 1], "layers");
    /// assert_eq!(config.layers_to_transform, Some(LayerIndices::Many(vec![0, 1])));
    /// assert_eq!(config.layers_pattern, Some(LayersPattern::One("layers".into())));
    /// ```
    pub fn layers(mut self, indices: impl IntoIterator<Item = usize>, pattern: &str) -> Self {
        self.layers_to_transform = Some(LayerIndices::Many(indices.into_iter().collect()));
        self.layers_pattern = Some(LayersPattern::One(pattern.to_string()));
        self
    }

    /// `rank_pattern`: per-module ranks, regex keys matched against the module path's tail,
    /// first match wins (so the order given is kept).
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).rank_pattern([("v_proj", 4)]);
    /// assert_eq!(config.rank_and_alpha("model.layers.0.self_attn.v_proj").unwrap().0, 4);
    /// assert_eq!(config.rank_and_alpha("model.layers.0.self_attn.q_proj").unwrap().0, 8);
    /// ```
    pub fn rank_pattern<K: Into<String>>(
        mut self,
        ranks: impl IntoIterator<Item = (K, usize)>,
    ) -> Self {
        self.rank_pattern = ranks.into_iter().map(|(k, r)| (k.into(), r)).collect();
        self
    }

    /// `alpha_pattern`: per-module alphas, matched like [`rank_pattern`](Self::rank_pattern).
    ///
    /// ```
    /// use peft_lora::LoraConfig;
    /// let config = LoraConfig::new(8).alpha_pattern([("v_proj", 32.0)]);
    /// assert_eq!(config.rank_and_alpha("model.layers.0.self_attn.v_proj").unwrap(), (8, 32.0));
    /// ```
    pub fn alpha_pattern<K: Into<String>>(
        mut self,
        alphas: impl IntoIterator<Item = (K, f64)>,
    ) -> Self {
        self.alpha_pattern = alphas
            .into_iter()
            .map(|(k, a)| (k.into(), a))
            .collect::<IndexMap<_, _>>();
        self
    }
}
