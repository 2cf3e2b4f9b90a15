//! ViT names (transformers' `models/vit/modeling_vit.py` and its `ViTModel` entry of
//! `conversion_mapping.py`).
//!
//! transformers 5 names the modules `layers.N.attention.{q,k,v,o}_proj`, `layers.N.mlp.fc{1,2}`;
//! the Hub checkpoints (and what transformers 5's `save_pretrained` still writes) carry the
//! pre-5.0 names `encoder.layer.N.attention.attention.{query,key,value}`,
//! `attention.output.dense`, `intermediate.dense`, `output.dense`. Our modules carry the 5.x
//! names (PEFT bundles target them); both key styles load, and saving writes the checkpoint
//! names transformers writes.

use crate::arch::{KeyRename, rename};

/// The prefix of the backbone in `ViTForImageClassification` checkpoints
/// (`base_model_prefix = "vit"`); `ViTModel` checkpoints have none.
pub(crate) const PREFIX: &str = "vit.";

/// Module paths a fresh image classifier may lack in a checkpoint (a new head).
pub(crate) const CLASSIFIER_NEW: &[&str] = &["classifier."];

/// `(module segment, checkpoint segment)`, each between dots, in the order saving applies them
/// (`attention.o_proj` before `mlp.fc2`, whose checkpoint name `output.dense` it contains).
const SEGMENTS: &[(&str, &str)] = &[
    (".layers.", ".encoder.layer."),
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".intermediate.dense."),
    (".mlp.fc2.", ".output.dense."),
];

/// Pre-5.0 checkpoint names -> module paths (5.x names pass unchanged), as transformers'
/// conversion mapping renames them.
fn legacy_renames() -> Vec<KeyRename> {
    let mut out = vec![rename(r"^(vit\.)?encoder\.layer\.", "${1}layers.")];
    out.extend(
        SEGMENTS[1..]
            .iter()
            .map(|(ours, hf)| rename(&regex::escape(hf), ours)),
    );
    out
}

/// Checkpoint -> module renames for a bare `ViTModel`: [`PREFIX`] dropped if present.
pub(crate) fn encoder_renames() -> Vec<KeyRename> {
    let mut out = vec![rename(r"^vit\.", "")];
    out.extend(legacy_renames());
    out
}

/// Checkpoint -> module renames for `ViTForImageClassification`: a bare encoder's keys
/// (`has_prefix` false) move under [`PREFIX`].
pub(crate) fn classifier_renames(has_prefix: bool) -> Vec<KeyRename> {
    let mut out = Vec::new();
    if !has_prefix {
        out.push(rename(
            r"^(embeddings|encoder|layers|layernorm|pooler)\.",
            "vit.$1.",
        ));
    }
    out.extend(legacy_renames());
    out
}

/// The checkpoint name transformers writes for a module path.
pub(crate) fn hf_name(path: &str) -> String {
    let mut name = format!(".{path}");
    for (ours, hf) in SEGMENTS {
        name = name.replace(ours, hf);
    }
    name[1..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(renames: &[KeyRename], key: &str) -> String {
        renames.iter().fold(key.to_string(), |k, (p, r)| {
            regex::Regex::new(p)
                .unwrap()
                .replace_all(&k, r.as_str())
                .into()
        })
    }

    #[test]
    fn save_names_invert_load_renames() {
        let paths = [
            "layers.0.attention.q_proj.weight",
            "layers.1.attention.k_proj.bias",
            "layers.1.attention.v_proj.weight",
            "layers.0.attention.o_proj.weight",
            "layers.0.mlp.fc1.weight",
            "layers.0.mlp.fc2.bias",
            "layers.0.layernorm_before.weight",
            "embeddings.patch_embeddings.projection.weight",
            "pooler.dense.weight",
        ];
        assert_eq!(
            hf_name(paths[0]),
            "encoder.layer.0.attention.attention.query.weight"
        );
        assert_eq!(
            hf_name(paths[3]),
            "encoder.layer.0.attention.output.dense.weight"
        );
        assert_eq!(hf_name(paths[5]), "encoder.layer.0.output.dense.bias");
        for path in paths {
            let saved = hf_name(path);
            assert_eq!(load(&encoder_renames(), &saved), path);
            // 5.x names load unchanged.
            assert_eq!(load(&encoder_renames(), path), path);
            let vit = format!("vit.{path}");
            assert_eq!(hf_name(&vit), format!("vit.{saved}"));
            assert_eq!(
                load(&classifier_renames(true), &format!("vit.{saved}")),
                vit
            );
            assert_eq!(load(&classifier_renames(false), &saved), vit);
            assert_eq!(load(&encoder_renames(), &format!("vit.{saved}")), path);
        }
    }
}
