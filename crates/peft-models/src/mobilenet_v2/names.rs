//! torchvision's state-dict keys <-> our module paths. torchvision numbers the layers of each
//! `nn.Sequential` (`features.2.conv.1.0`); our modules name them (`blocks.1.depthwise.conv`),
//! and a block without an expansion layer numbers its layers from 0, so the renames are listed
//! per block from the built model.

use super::MobileNetV2;
use crate::arch::{KeyRename, rename};

/// `(torchvision prefix, module path prefix)` for every layer of `model`, both with a
/// trailing dot.
fn prefixes(model: &MobileNetV2) -> Vec<(String, String)> {
    let mut out = vec![
        ("features.0.0.".into(), "stem.conv.".into()),
        ("features.0.1.".into(), "stem.bn.".into()),
    ];
    for (i, block) in model.blocks.iter().enumerate() {
        let ours = format!("blocks.{i}.");
        let theirs = format!("features.{}.conv.", i + 1);
        let [dw, project, project_bn] = block.indices();
        if block.expand.is_some() {
            out.push((format!("{theirs}0.0."), format!("{ours}expand.conv.")));
            out.push((format!("{theirs}0.1."), format!("{ours}expand.bn.")));
        }
        out.push((format!("{theirs}{dw}.0."), format!("{ours}depthwise.conv.")));
        out.push((format!("{theirs}{dw}.1."), format!("{ours}depthwise.bn.")));
        out.push((format!("{theirs}{project}."), format!("{ours}project.")));
        out.push((format!("{theirs}{project_bn}."), format!("{ours}project_bn.")));
    }
    let head = model.head_index();
    out.push((format!("features.{head}.0."), "head.conv.".into()));
    out.push((format!("features.{head}.1."), "head.bn.".into()));
    out.push(("classifier.1.".into(), "classifier.".into()));
    out
}

/// Checkpoint key -> module path renames (regexes anchored at the start).
pub(crate) fn renames(model: &MobileNetV2) -> Vec<KeyRename> {
    prefixes(model)
        .into_iter()
        .map(|(theirs, ours)| rename(&format!("^{}", regex_escape(&theirs)), &ours))
        .collect()
}

/// The torchvision key of module path `path` (a parameter or buffer), for saving.
pub(crate) fn torchvision_name(model: &MobileNetV2, path: &str) -> String {
    prefixes(model)
        .into_iter()
        .find_map(|(theirs, ours)| path.strip_prefix(&ours).map(|rest| format!("{theirs}{rest}")))
        .unwrap_or_else(|| path.to_string())
}

fn regex_escape(text: &str) -> String {
    text.replace('.', "\\.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mobilenet_v2::MobileNetV2Config;
    use burn::tensor::Device;

    #[test]
    fn keys_and_paths_map_both_ways() {
        let model = MobileNetV2::new(&MobileNetV2Config::default(), Some(1000), &Device::flex());
        assert_eq!(torchvision_name(&model, "blocks.0.project.weight"), "features.1.conv.1.weight");
        assert_eq!(
            torchvision_name(&model, "blocks.1.depthwise.bn.running_var"),
            "features.2.conv.1.1.running_var"
        );
        assert_eq!(torchvision_name(&model, "blocks.16.project_bn.bias"), "features.17.conv.3.bias");
        assert_eq!(torchvision_name(&model, "head.conv.weight"), "features.18.0.weight");
        assert_eq!(torchvision_name(&model, "classifier.bias"), "classifier.1.bias");
        let renames = renames(&model);
        assert!(renames.contains(&(r"^features\.1\.conv\.1\.".into(), "blocks.0.project.".into())));
    }
}
