//! GPT-2 names (transformers' `models/gpt2/modeling_gpt2.py`).

use crate::arch::{KeyRename, rename};

/// The layers GPT-2 builds from `Conv1D` (`pytorch_utils.py`), whose checkpoint weights are
/// `[in, out]`, already our layout: neither loading nor saving transposes them.
const CONV1D: &[&str] = &["c_attn", "c_proj", "c_fc"];

/// Whether a tensor name is the weight of a [`CONV1D`] layer.
pub(crate) fn is_conv1d_weight(name: &str) -> bool {
    CONV1D
        .iter()
        .any(|layer| name.ends_with(&format!(".{layer}.weight")))
}

/// The prefix of the backbone in task checkpoints (`base_model_prefix = "transformer"`).
pub(crate) const PREFIX: &str = "transformer.";

/// The token embedding table, which the LM head is tied to.
pub(crate) const TOKEN_EMBEDDING: &str = "transformer.wte.weight";

/// Where `GPT2LMHeadModel` looks for its head when `tie_word_embeddings` is false.
pub(crate) const LM_HEAD: &str = "lm_head.weight";

/// Module paths a fresh sequence-classification model may lack in a checkpoint (a new head).
pub(crate) const CLASSIFIER_NEW: &[&str] = &["score."];

/// Checkpoint -> module renames: a bare `GPT2Model` checkpoint's keys (`has_prefix` false)
/// move under [`PREFIX`]; other names are the module paths.
pub(crate) fn renames(has_prefix: bool) -> Vec<KeyRename> {
    if has_prefix {
        Vec::new()
    } else {
        vec![rename(r"^(wte|wpe|h|ln_f)\.", "transformer.$1.")]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv1d_weights_are_named() {
        assert!(is_conv1d_weight("transformer.h.0.attn.c_attn.weight"));
        assert!(is_conv1d_weight("transformer.h.0.mlp.c_proj.weight"));
        assert!(!is_conv1d_weight("transformer.h.0.attn.c_attn.bias"));
        assert!(!is_conv1d_weight("lm_head.weight"));
    }
}
