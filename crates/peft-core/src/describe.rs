//! What a method says about itself to tools such as `burn-peft inspect`, so that they need no
//! knowledge of any method: its notable config values and the role of each tensor it saves.

use serde_json::Value;

use crate::bundle;
use crate::method::PeftMethod;

/// A method's own summary of a config ([`PeftMethod::describe`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodSummary {
    /// Config entries worth showing, in display order: the key and the value as
    /// `adapter_config.json` holds it.
    pub entries: Vec<(String, Value)>,
    /// Every kind of tensor the method writes into a bundle.
    pub tensors: Vec<TensorRole>,
}

/// One kind of tensor a method writes into a bundle.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TensorRole {
    /// The key after the module path (`lora_A.weight` in
    /// `base_model.model.<path>.lora_A.weight`), or the whole key for tensors saved under a bare
    /// name (`prompt_embeddings`).
    pub suffix: String,
    /// What the tensor is, for people (`LoRA down-projection A [r, in]`).
    pub description: String,
    /// The axis that holds the adapter's rank, on the one tensor per adapted module that
    /// defines it (LoRA's `A`), so that tools count each module once.
    pub rank_axis: Option<usize>,
}

impl TensorRole {
    /// A role for the tensors whose keys end in `suffix`.
    pub fn new(suffix: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            suffix: suffix.into(),
            description: description.into(),
            rank_axis: None,
        }
    }

    /// The same role, with the rank on `axis`.
    pub fn with_rank_axis(mut self, axis: usize) -> Self {
        self.rank_axis = Some(axis);
        self
    }

    /// The module path of `key` if this role names it (`Some("")` for a bare key), else `None`.
    ///
    /// ```
    /// use peft_core::TensorRole;
    /// let role = TensorRole::new("lora_A.weight", "A");
    /// assert_eq!(role.module_of("base_model.model.h.0.attn.lora_A.weight"), Some("base_model.model.h.0.attn"));
    /// assert_eq!(role.module_of("base_model.model.h.0.attn.xlora_A.weight"), None);
    /// assert_eq!(TensorRole::new("prompt_embeddings", "P").module_of("prompt_embeddings"), Some(""));
    /// ```
    pub fn module_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        if key == self.suffix {
            return Some("");
        }
        key.strip_suffix(self.suffix.as_str())?.strip_suffix('.')
    }
}

impl MethodSummary {
    /// A summary showing the entries `keys` of `method`'s saved config that are present and not
    /// `null`, in this order, and the tensor roles `tensors`.
    ///
    /// ```
    /// use peft_core::{MethodSummary, TensorRole};
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    /// # struct Scale { target_modules: Vec<String>, note: Option<String> }
    /// # #[typetag::serde(name = "SCALE_DOC")]
    /// # impl peft_core::PeftMethod for Scale {
    /// #     fn targets(&self) -> peft_core::TargetSpec { Default::default() }
    /// #     fn supports(&self, _: &peft_core::SiteKind) -> bool { false }
    /// #     fn create_adapter(&self, _: &str, _: &peft_core::SiteInfo) -> peft_core::Result<peft_core::AdapterState> { Err(peft_core::PeftError::InvalidState("docs".into())) }
    /// #     fn clone_method(&self) -> Box<dyn peft_core::PeftMethod> { Box::new(self.clone()) }
    /// # }
    /// let method = Scale { target_modules: vec!["fc".into()], note: None };
    /// let summary = MethodSummary::from_config(&method, &["target_modules", "note"], vec![TensorRole::new("scale", "l")]);
    /// assert_eq!(summary.entries, vec![("target_modules".to_string(), serde_json::json!(["fc"]))]);
    /// ```
    pub fn from_config(method: &dyn PeftMethod, keys: &[&str], tensors: Vec<TensorRole>) -> Self {
        let config = bundle::method_to_json(method);
        let entries = keys
            .iter()
            .filter_map(|key| {
                config
                    .get(*key)
                    .filter(|v| !v.is_null())
                    .map(|v| (key.to_string(), v.clone()))
            })
            .collect();
        Self { entries, tensors }
    }

    /// The role whose suffix names `key`, the longest first.
    pub fn role_of(&self, key: &str) -> Option<&TensorRole> {
        self.tensors
            .iter()
            .filter(|r| r.module_of(key).is_some())
            .max_by_key(|r| r.suffix.len())
    }
}
