//! BERT names (transformers' `models/bert/modeling_bert.py`).

use crate::arch::{KeyRename, rename};

/// `(Hugging Face segment, module segment)` pairs: `LayerNorm` is not snake case and `self`
/// (`BertAttention.self`, the `BertSelfAttention`) is a Rust keyword.
const SEGMENTS: &[(&str, &str)] = &[("LayerNorm", "layer_norm"), ("self", "self_attn")];

/// The prefix of the encoder in task checkpoints (`BertForSequenceClassification`,
/// `BertForMaskedLM`, `BertForPreTraining`: `base_model_prefix = "bert"`); `BertModel`
/// checkpoints have none.
pub(crate) const PREFIX: &str = "bert.";

/// Module paths a fresh sequence-classification model may lack in a checkpoint (a new head, and
/// the pooler that sentence-transformers checkpoints drop); they stay initialized.
pub(crate) const CLASSIFIER_NEW: &[&str] = &["classifier.", "bert.pooler."];

/// Segment renames, checkpoint -> module.
fn segment_renames() -> Vec<KeyRename> {
    SEGMENTS
        .iter()
        .map(|(hf, ours)| rename(&format!(r"\.{hf}\."), &format!(".{ours}.")))
        .collect()
}

/// Checkpoint -> module renames for a bare encoder (`BertModel`): [`PREFIX`] dropped if present.
pub(crate) fn encoder_renames() -> Vec<KeyRename> {
    let mut out = vec![rename(r"^bert\.", "")];
    out.extend(segment_renames());
    out
}

/// Checkpoint -> module renames for `BertForSequenceClassification`: a bare encoder's keys
/// (`has_prefix` false) move under [`PREFIX`].
pub(crate) fn classifier_renames(has_prefix: bool) -> Vec<KeyRename> {
    let mut out = Vec::new();
    if !has_prefix {
        out.push(rename(r"^(embeddings|encoder|pooler)\.", "bert.$1."));
    }
    out.extend(segment_renames());
    out
}

/// The Hugging Face name of a module path (the inverse of the segment renames):
/// `layer_norm` -> `LayerNorm`, `attention.self_attn` -> `attention.self`.
pub(crate) fn hf_name(path: &str) -> String {
    path.split('.')
        .map(|segment| {
            SEGMENTS
                .iter()
                .find(|(_, ours)| *ours == segment)
                .map_or(segment, |(hf, _)| hf)
        })
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_names_invert_load_renames() {
        assert_eq!(
            hf_name("encoder.layer.0.attention.self_attn.query.weight"),
            "encoder.layer.0.attention.self.query.weight"
        );
        assert_eq!(
            hf_name("embeddings.layer_norm.weight"),
            "embeddings.LayerNorm.weight"
        );
        // Each load pattern renames exactly the segment `hf_name` maps back.
        for ((pattern, replacement), (hf, ours)) in segment_renames().iter().zip(SEGMENTS) {
            assert_eq!(pattern, &format!(r"\.{hf}\."));
            assert_eq!(replacement, &format!(".{ours}."));
            assert_eq!(hf_name(ours), *hf);
        }
    }
}
