//! ResNet names (transformers' `models/resnet/modeling_resnet.py`).

use crate::arch::{KeyRename, rename};

/// The prefix of the backbone in `ResNetForImageClassification` checkpoints
/// (`base_model_prefix = "resnet"`); `ResNetModel` checkpoints have none.
pub(crate) const PREFIX: &str = "resnet.";

/// Module paths a fresh classifier may lack in a checkpoint (a new head): they stay
/// initialized.
pub(crate) const CLASSIFIER_NEW: &[&str] = &["classifier."];

/// The classifier's linear: `classifier.1` in checkpoints (the second module of
/// `Sequential(Flatten, Linear)`), `classifier.linear` in the module tree.
const HF_LINEAR: &str = "classifier.1.";
const OUR_LINEAR: &str = "classifier.linear.";

/// Checkpoint -> module renames for a bare `ResNetModel`: [`PREFIX`] dropped if present.
pub(crate) fn encoder_renames() -> Vec<KeyRename> {
    vec![rename(r"^resnet\.", "")]
}

/// Checkpoint -> module renames for `ResNetForImageClassification`: a bare backbone's keys
/// (`has_prefix` false) move under [`PREFIX`]; `classifier.1` is `classifier.linear`.
pub(crate) fn classifier_renames(has_prefix: bool) -> Vec<KeyRename> {
    let mut out = Vec::new();
    if !has_prefix {
        out.push(rename(r"^(embedder|encoder)\.", "resnet.$1."));
    }
    out.push(rename(r"^classifier\.1\.", OUR_LINEAR));
    out
}

/// The Hugging Face name of a module path (the inverse of the renames, keys of a
/// `ResNetForImageClassification` keeping [`PREFIX`]).
pub(crate) fn hf_name(path: &str) -> String {
    match path.strip_prefix(OUR_LINEAR) {
        Some(rest) => format!("{HF_LINEAR}{rest}"),
        None => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_names_invert_load_renames() {
        assert_eq!(hf_name("classifier.linear.weight"), "classifier.1.weight");
        assert_eq!(
            hf_name("resnet.encoder.stages.0.layers.0.layer.1.convolution.weight"),
            "resnet.encoder.stages.0.layers.0.layer.1.convolution.weight"
        );
        let renames = classifier_renames(true);
        let (pattern, replacement) = renames.last().unwrap();
        let re = regex::Regex::new(pattern).unwrap();
        let loaded = re.replace("classifier.1.bias", replacement.as_str());
        assert_eq!(hf_name(&loaded), "classifier.1.bias");
    }
}
