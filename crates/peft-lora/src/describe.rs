//! What `inspect`-like tools show about a LoRA config ([`PeftMethod::describe`]).

use peft_core::{MethodSummary, PeftMethod, TensorRole};
use serde_json::Value;

use crate::LoraConfig;
use crate::dora::MAGNITUDE_KEY;

/// Config keys worth a line, in this order.
const SHOWN_KEYS: &[&str] = &[
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "modules_to_save",
];

/// The summary of `config`: [`SHOWN_KEYS`] (plus `use_dora` when set) and LoRA's tensors.
pub(crate) fn summary(config: &LoraConfig) -> MethodSummary {
    let method: &dyn PeftMethod = config;
    let mut tensors = vec![
        TensorRole::new("lora_A.weight", "LoRA down-projection A [r, in]").with_rank_axis(0),
        TensorRole::new("lora_B.weight", "LoRA up-projection B [out, r]"),
        TensorRole::new("lora_embedding_A", "embedding LoRA A [r, vocab]").with_rank_axis(0),
        TensorRole::new("lora_embedding_B", "embedding LoRA B [dim, r]"),
    ];
    if config.use_dora {
        tensors.push(TensorRole::new(
            MAGNITUDE_KEY,
            "DoRA magnitude m [out] (column norms of W + s·B·A at init)",
        ));
    }
    let mut summary = MethodSummary::from_config(method, SHOWN_KEYS, tensors);
    if config.use_dora {
        summary.entries.push(("use_dora".into(), Value::Bool(true)));
    }
    summary
}
