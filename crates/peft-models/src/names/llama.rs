//! Llama-family names (transformers' `models/llama/modeling_llama.py`; Qwen2 and Mistral
//! share them): the module paths are the checkpoint names, in both directions.

use super::KeyRename;

/// Module paths a fresh sequence-classification model may lack in a checkpoint (a new head).
pub(crate) const CLASSIFIER_NEW: &[&str] = &["score."];

/// Checkpoint -> module renames: none.
pub(crate) fn renames() -> Vec<KeyRename> {
    Vec::new()
}
