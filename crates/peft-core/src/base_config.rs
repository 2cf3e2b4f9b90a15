//! [`PeftConfigBase`]: the fields every PEFT config has, whatever the method.

use serde::{Deserialize, Serialize};
use serde_json::Value;

fn default_true() -> bool {
    true
}

/// The fields every PEFT config carries, whatever the method: PEFT's `PeftConfigMixin`
/// (`auto_mapping`, `peft_version`) and `PeftConfig` (`base_model_name_or_path`, `revision`,
/// `task_type`, `inference_mode`), in `peft/config.py`. `peft_type`, the last of them, is the tag
/// under which a method registers (`#[typetag::serde(name = "LORA")]`), not a field.
///
/// Method configs embed it with `#[serde(flatten)]`, so the keys stay at the top level of
/// `adapter_config.json`, where PEFT writes them (the file's keys are sorted on writing, so the
/// bytes do not depend on where the struct sits).
///
/// ```
/// use peft_core::PeftConfigBase;
/// let base = PeftConfigBase::for_task("SEQ_CLS");
/// assert_eq!(base.task_type.as_deref(), Some("SEQ_CLS"));
/// assert!(base.inference_mode);
/// let json = serde_json::to_value(&base).unwrap();
/// assert_eq!(json["task_type"], "SEQ_CLS");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeftConfigBase {
    /// PEFT task type (`SEQ_CLS`, `CAUSAL_LM`, ...); decides the default `modules_to_save` and
    /// `all-linear`'s exclusions.
    pub task_type: Option<String>,
    /// Base model hub id or folder.
    pub base_model_name_or_path: Option<String>,
    /// Base model revision.
    pub revision: Option<String>,
    /// PEFT writes `true` when saving.
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    /// Informational.
    pub auto_mapping: Option<Value>,
    /// The PEFT version that wrote the file (informational).
    pub peft_version: Option<String>,
}

impl Default for PeftConfigBase {
    fn default() -> Self {
        Self {
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: true,
            auto_mapping: None,
            peft_version: None,
        }
    }
}

impl PeftConfigBase {
    /// The defaults with `task_type` set.
    pub fn for_task(task_type: impl Into<String>) -> Self {
        Self {
            task_type: Some(task_type.into()),
            ..Self::default()
        }
    }
}
