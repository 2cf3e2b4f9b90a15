//! Single-file Stable Diffusion checkpoints (the original LDM / CompVis and SGM layouts that
//! diffusers' `from_single_file` reads): which tensor of the file a diffusers module's weight
//! is. This follows diffusers 0.42 (loaders/single_file_utils.py): `convert_ldm_unet_checkpoint`
//! for the UNet (`model.diffusion_model.`), `convert_ldm_clip_checkpoint` for CLIP text encoders
//! (`cond_stage_model.transformer.`, SDXL's `conditioner.embedders.0.transformer.`) and
//! `convert_open_clip_checkpoint` for OpenCLIP ones (SD 2.x `cond_stage_model.model.`, SDXL's
//! `conditioner.embedders.1.model.`, the SDXL refiner's `conditioner.embedders.0.model.`), whose
//! fused attention `in_proj_weight` holds q, k and v as row blocks.
//!
//! A single file has no `config.json`: the UNet's `layers_per_block` comes from its key set (the
//! input blocks holding a downsampler `op`, and the counts of input and output blocks), and a
//! key set that fits no such UNet is refused.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::fuse_types::FuseError;
use super::header::Header;
use super::{LoraModule, UnetConfig};

const UNET: &str = "model.diffusion_model.";

/// Text encoder prefixes: (prefix, diffusers component, OpenCLIP layout).
const TEXT_ENCODERS: [(&str, &str, bool); 5] = [
    ("cond_stage_model.transformer.", "text_encoder", false),
    (
        "conditioner.embedders.0.transformer.",
        "text_encoder",
        false,
    ),
    ("cond_stage_model.model.", "text_encoder", true),
    ("conditioner.embedders.1.model.", "text_encoder_2", true),
    // The SDXL refiner has only the OpenCLIP encoder, diffusers' `text_encoder_2`.
    ("conditioner.embedders.0.model.", "text_encoder_2", true),
];

/// Keys diffusers' `convert_open_clip_checkpoint` leaves out (SD 2.x's text encoder has 23 of
/// OpenCLIP's 24 layers): `SD_2_TEXT_ENCODER_KEYS_TO_IGNORE`, of which only weights matter here.
const SD2_IGNORED: &str = "cond_stage_model.model.transformer.resblocks.23.";

/// Where a diffusers weight lives in the file: a tensor, or a block of its rows (q / k / v of
/// an OpenCLIP `in_proj_weight`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// The file's tensor name.
    pub(super) key: String,
    /// `(first row, rows)` of the tensor, or `None` for all of it.
    pub(super) rows: Option<(usize, usize)>,
}

/// The diffusers weights of a single-file checkpoint.
#[derive(Debug)]
pub(super) struct LdmLayout {
    /// `(component, diffusers weight name)` -> where it is in the file.
    map: HashMap<(&'static str, String), Target>,
    /// The UNet's `layers_per_block`, from its key set.
    pub(super) unet_config: UnetConfig,
}

fn unknown(file: &Path, reason: impl Into<String>) -> FuseError {
    FuseError::UnknownLayout {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

/// diffusers' `update_unet_resnet_ldm_to_diffusers` renames.
fn resnet(rest: &str) -> String {
    rest.replace("in_layers.0", "norm1")
        .replace("in_layers.2", "conv1")
        .replace("out_layers.0", "norm2")
        .replace("out_layers.3", "conv2")
        .replace("emb_layers.1", "time_emb_proj")
        .replace("skip_connection", "conv_shortcut")
}

/// `<name>.<index>.<rest>` -> (index, rest).
fn indexed<'a>(key: &'a str, name: &str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(name)?.strip_prefix('.')?;
    let (index, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// The UNet's `layers_per_block` from its key set (names without `model.diffusion_model.`), as
/// the SGM block numbering implies it: `n = layers_per_block + 1` input blocks per down block
/// (a downsampler `op` closes every block but the last), `n` output blocks per up block.
fn layers_per_block(file: &Path, keys: &[&str]) -> Result<usize, FuseError> {
    let blocks = |name: &str| -> BTreeSet<usize> {
        keys.iter()
            .filter_map(|k| indexed(k, name).map(|(i, _)| i))
            .collect()
    };
    let (inputs, outputs) = (blocks("input_blocks"), blocks("output_blocks"));
    let contiguous = |s: &BTreeSet<usize>| s.iter().copied().eq(0..s.len());
    if inputs.len() < 2 || !contiguous(&inputs) || !contiguous(&outputs) {
        return Err(unknown(
            file,
            format!(
                "UNet input blocks {inputs:?} / output blocks {outputs:?} are not numbered 0..N as in an SD UNet"
            ),
        ));
    }
    let ops: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|i| keys.contains(&format!("input_blocks.{i}.0.op.weight").as_str()))
        .collect();
    // With downsamplers, the first closes down block 0: it is input block `n`.
    let n = ops.first().copied().unwrap_or(inputs.len());
    let down_blocks = ops.len() + 1;
    let fits = n >= 2
        && ops.iter().enumerate().all(|(b, i)| *i == (b + 1) * n)
        && inputs.len() == down_blocks * n
        && outputs.len() == down_blocks * n;
    if !fits {
        return Err(unknown(
            file,
            format!(
                "the UNet's {} input blocks (downsamplers at {ops:?}) and {} output blocks fit no `layers_per_block`",
                inputs.len(),
                outputs.len()
            ),
        ));
    }
    Ok(n - 1)
}

/// The diffusers name of a UNet tensor (`model.diffusion_model.` removed), as diffusers'
/// `convert_ldm_unet_checkpoint` gives it; `None` for one it does not convert.
fn unet_name(key: &str, n: usize, sdxl: bool) -> Option<String> {
    const DIRECT: [(&str, &str); 5] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (ldm, diffusers) in DIRECT {
        if let Some(rest) = key.strip_prefix(ldm) {
            return Some(format!("{diffusers}{rest}"));
        }
    }
    // `label_emb`: SDXL's `add_embedding` (addition_embed_type "text_time"), else the
    // `class_embedding` of a "projection" class embedding.
    for (ldm, linear) in [
        ("label_emb.0.0.", "linear_1."),
        ("label_emb.0.2.", "linear_2."),
    ] {
        if let Some(rest) = key.strip_prefix(ldm) {
            let embedding = if sdxl {
                "add_embedding"
            } else {
                "class_embedding"
            };
            return Some(format!("{embedding}.{linear}{rest}"));
        }
    }
    if let Some((i, rest)) = indexed(key, "input_blocks") {
        let (j, rest) = rest.split_once('.')?;
        let (block, layer) = ((i.checked_sub(1)?) / n, (i - 1) % n);
        return match j {
            "0" => Some(match rest.strip_prefix("op.") {
                Some(param) => format!("down_blocks.{block}.downsamplers.0.conv.{param}"),
                None => format!("down_blocks.{block}.resnets.{layer}.{}", resnet(rest)),
            }),
            "1" => Some(format!("down_blocks.{block}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    if let Some((k, rest)) = indexed(key, "middle_block") {
        return Some(if k % 2 == 0 {
            format!("mid_block.resnets.{}.{}", k.saturating_sub(1), resnet(rest))
        } else {
            format!("mid_block.attentions.{}.{rest}", k - 1)
        });
    }
    if let Some((i, rest)) = indexed(key, "output_blocks") {
        let (j, rest) = rest.split_once('.')?;
        let (block, layer) = (i / n, i % n);
        return match (j, rest.strip_prefix("conv.")) {
            ("1" | "2", Some(param)) => {
                Some(format!("up_blocks.{block}.upsamplers.0.conv.{param}"))
            }
            ("0", _) => Some(format!(
                "up_blocks.{block}.resnets.{layer}.{}",
                resnet(rest)
            )),
            ("1", None) => Some(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    None
}

/// The diffusers name of an OpenCLIP transformer tensor (`<prefix>transformer.` removed), as
/// `convert_open_clip_checkpoint` renames it (`in_proj_weight` dropped: the caller splits it).
fn open_clip_name(rest: &str) -> String {
    const RENAMES: [(&str, &str); 6] = [
        ("resblocks.", "text_model.encoder.layers."),
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        (".c_fc.", ".fc1."),
        (".c_proj.", ".fc2."),
        (".attn", ".self_attn"),
    ];
    let mut name = rest.to_string();
    for (ldm, diffusers) in RENAMES {
        name = name.replace(ldm, diffusers);
    }
    name.replace(".in_proj_weight", "")
}

impl LdmLayout {
    /// Read the layout of the single-file checkpoint `file` from its header.
    pub(super) fn read(file: &Path, header: &Header) -> Result<Self, FuseError> {
        let unet_keys: Vec<&str> = header
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(UNET))
            .collect();
        if unet_keys.is_empty() {
            let example = header.tensors.keys().next().cloned().unwrap_or_default();
            return Err(unknown(
                file,
                format!(
                    "no `{UNET}` tensors (e.g. `{example}`): not a single-file SD 1.x / 2.x / SDXL checkpoint in the original (LDM / SGM) layout"
                ),
            ));
        }
        let layers = layers_per_block(file, &unet_keys)?;
        let sdxl = header
            .tensors
            .keys()
            .any(|k| k.starts_with("conditioner.embedders."));
        let mut map = HashMap::new();
        for key in &unet_keys {
            if let Some(name) = unet_name(key, layers + 1, sdxl) {
                map.insert(
                    ("unet", name),
                    Target {
                        key: format!("{UNET}{key}"),
                        rows: None,
                    },
                );
            }
        }
        for (key, info) in &header.tensors {
            let Some((prefix, component, open_clip)) =
                TEXT_ENCODERS.iter().find(|(p, _, _)| key.starts_with(p))
            else {
                continue;
            };
            let rest = &key[prefix.len()..];
            if !open_clip {
                // `convert_ldm_clip_checkpoint`: the prefix goes, the rest is transformers'.
                let target = Target {
                    key: key.clone(),
                    rows: None,
                };
                map.insert((*component, rest.to_string()), target);
                continue;
            }
            let Some(rest) = rest.strip_prefix("transformer.") else {
                continue;
            };
            if key.starts_with(SD2_IGNORED) {
                continue;
            }
            let name = open_clip_name(rest);
            if !key.ends_with(".in_proj_weight") {
                let target = Target {
                    key: key.clone(),
                    rows: None,
                };
                map.insert((*component, name), target);
                continue;
            }
            // q, k, v: rows [0, d), [d, 2d), [2d, 3d), `d` the `text_projection`'s first axis
            // where the file has one, else the hidden size (diffusers' `text_proj_dim`).
            let hidden = info.shape.get(1).copied().unwrap_or(0);
            let d = header
                .tensors
                .get(&format!("{prefix}text_projection"))
                .and_then(|p| p.shape.first().copied())
                .unwrap_or(hidden);
            if info.shape.len() != 2 || info.shape[0] != 3 * d {
                return Err(unknown(
                    file,
                    format!(
                        "`{key}` has shape {:?}; a fused q / k / v projection of width {d} has [{}, {hidden}]",
                        info.shape,
                        3 * d
                    ),
                ));
            }
            for (i, proj) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
                let target = Target {
                    key: key.clone(),
                    rows: Some((i * d, d)),
                };
                map.insert((*component, format!("{name}.{proj}.weight")), target);
            }
        }
        Ok(LdmLayout {
            map,
            unet_config: UnetConfig {
                layers_per_block: layers,
            },
        })
    }

    /// Where in the file the weight a LoRA module adapts is.
    pub(super) fn locate(&self, module: &LoraModule) -> Option<&Target> {
        let component = module.network.component();
        let path = module
            .diffusers_path
            .as_deref()?
            .strip_prefix(component)?
            .strip_prefix('.')?;
        let direct = format!("{path}.weight");
        self.map.get(&(component, direct)).or_else(|| {
            // A text-encoder module named without transformers' `text_model.` wrapper.
            (component != "unet")
                .then(|| {
                    self.map
                        .get(&(component, format!("text_model.{path}.weight")))
                })
                .flatten()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_diffusers() {
        // SD 1.x: layers_per_block 2.
        let cases = [
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "input_blocks.5.0.in_layers.2.weight",
                "down_blocks.1.resnets.1.conv1.weight",
            ),
            (
                "input_blocks.6.0.op.weight",
                "down_blocks.1.downsamplers.0.conv.weight",
            ),
            (
                "middle_block.2.emb_layers.1.weight",
                "mid_block.resnets.1.time_emb_proj.weight",
            ),
            (
                "middle_block.1.proj_out.weight",
                "mid_block.attentions.0.proj_out.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.weight",
                "up_blocks.1.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.0.skip_connection.weight",
                "up_blocks.1.resnets.2.conv_shortcut.weight",
            ),
            (
                "output_blocks.7.1.proj_in.weight",
                "up_blocks.2.attentions.1.proj_in.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(
                unet_name(ldm, 3, false).as_deref(),
                Some(diffusers),
                "{ldm}"
            );
        }
        assert_eq!(
            unet_name("label_emb.0.0.weight", 3, true).as_deref(),
            Some("add_embedding.linear_1.weight")
        );
        assert_eq!(
            open_clip_name("resblocks.3.mlp.c_proj.weight"),
            "text_model.encoder.layers.3.mlp.fc2.weight"
        );
        assert_eq!(
            open_clip_name("resblocks.3.attn.in_proj_weight"),
            "text_model.encoder.layers.3.self_attn"
        );
    }

    #[test]
    fn layers_per_block_comes_from_the_key_set() {
        let path = Path::new("x.safetensors");
        // SD 1.x: 12 input blocks, downsamplers at 3, 6, 9; 12 output blocks.
        let mut keys: Vec<String> = (0..12)
            .map(|i| format!("input_blocks.{i}.0.weight"))
            .chain((0..12).map(|i| format!("output_blocks.{i}.0.weight")))
            .collect();
        keys.extend([3, 6, 9].map(|i| format!("input_blocks.{i}.0.op.weight")));
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert_eq!(layers_per_block(path, &refs).unwrap(), 2);
        // An output block missing: no UNet geometry fits.
        let refs: Vec<&str> = refs
            .into_iter()
            .filter(|k| !k.starts_with("output_blocks.11"))
            .collect();
        let err = layers_per_block(path, &refs).unwrap_err();
        assert!(
            err.to_string().contains("fit no `layers_per_block`"),
            "{err}"
        );
    }
}
