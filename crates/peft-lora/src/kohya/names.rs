//! Key names: which format, module, network and role a key has, and kohya names -> diffusers
//! module paths.

use super::{LoraFormat, Network};

/// What a tensor is to its module.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Role {
    /// The down projection (`lora_down`, `lora_A`, `lora.down`).
    Down,
    /// The up projection (`lora_up`, `lora_B`, `lora.up`).
    Up,
    /// The scalar `alpha`.
    Alpha,
    /// A DoRA magnitude (`dora_scale`, `lora_magnitude_vector`).
    Dora,
}

/// Format (`None` for a diffusers `.alpha`, which both diffusers formats use), module name,
/// network and role of one key.
type Classified = (Option<LoraFormat>, String, Network, Role);

pub(super) fn classify(key: &str) -> Result<Classified, String> {
    // Kohya: `<lora_name>.<suffix>`, the name without dots (sd-scripts networks/lora.py
    // `create_network_from_weights`: `lora_name = key.split(".")[0]`).
    for (prefix, network) in [
        ("lora_unet_", Network::Unet),
        ("lora_te_", Network::TextEncoder),
        ("lora_te1_", Network::TextEncoder1),
        ("lora_te2_", Network::TextEncoder2),
    ] {
        if key.starts_with(prefix) {
            let (name, suffix) = key.split_once('.').ok_or(
                "a kohya key needs a `.lora_down.weight` / `.lora_up.weight` / `.alpha` suffix",
            )?;
            let role = match suffix {
                "lora_down.weight" => Role::Down,
                "lora_up.weight" => Role::Up,
                "alpha" => Role::Alpha,
                "dora_scale" => Role::Dora,
                other => {
                    return Err(format!(
                        "suffix `{other}`: only plain LoRA / LoCon (lora_down, lora_up, alpha, dora_scale) is read, not LoHa / LoKr / Tucker"
                    ));
                }
            };
            return Ok((Some(LoraFormat::Kohya), name.to_string(), network, role));
        }
    }
    let network = [
        ("unet.", Network::Unet),
        ("text_encoder.", Network::TextEncoder),
        ("text_encoder_2.", Network::TextEncoder2),
    ]
    .into_iter()
    .find_map(|(prefix, network)| key.starts_with(prefix).then_some(network))
    .ok_or("keys start with `lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`, `unet.`, `text_encoder.` or `text_encoder_2.`")?;
    // Longest suffixes first: `.lora.down.weight` also ends `_lora.down.weight`'s tail.
    const SUFFIXES: &[(&str, LoraFormat, Role)] = &[
        (".lora_A.weight", LoraFormat::PeftLike, Role::Down),
        (".lora_B.weight", LoraFormat::PeftLike, Role::Up),
        (
            ".lora_magnitude_vector.weight",
            LoraFormat::PeftLike,
            Role::Dora,
        ),
        (".lora_magnitude_vector", LoraFormat::PeftLike, Role::Dora),
        (
            ".lora_linear_layer.down.weight",
            LoraFormat::Diffusers,
            Role::Down,
        ),
        (
            ".lora_linear_layer.up.weight",
            LoraFormat::Diffusers,
            Role::Up,
        ),
        (".lora.down.weight", LoraFormat::Diffusers, Role::Down),
        (".lora.up.weight", LoraFormat::Diffusers, Role::Up),
        ("_lora.down.weight", LoraFormat::Diffusers, Role::Down),
        ("_lora.up.weight", LoraFormat::Diffusers, Role::Up),
    ];
    for (suffix, format, role) in SUFFIXES {
        if let Some(module) = key.strip_suffix(suffix) {
            return Ok((Some(*format), module.to_string(), network, *role));
        }
    }
    if let Some(module) = key.strip_suffix(".alpha") {
        // diffusers keeps kohya alphas as `<component>.<path>.alpha` (`_get_alpha_name` in
        // loaders/lora_conversion_utils.py), in either of its formats: the module's weights
        // decide the format.
        return Ok((None, module.to_string(), network, Role::Alpha));
    }
    Err("no LoRA suffix (`.lora_A.weight`, `.lora_B.weight`, `.lora.down.weight`, `.lora.up.weight`, `.alpha`, ...)".into())
}

/// The module path of a diffusers-format name: attention processors' `processor.to_q` (old
/// `AttnProcsLayers` files) is the attention's `to_q`, and `processor.to_out` its `to_out.0`
/// (diffusers `LoRAAttnProcessor` wraps `attn.to_out[0]`).
pub(super) fn diffusers_module_path(name: &str) -> String {
    match name.split_once(".processor.") {
        Some((attn, "to_out")) => format!("{attn}.to_out.0"),
        Some((attn, proj)) => format!("{attn}.{proj}"),
        None => name.to_string(),
    }
}

/// Multi-word segments of diffusers' `UNet2DConditionModel` and transformers' `CLIPTextModel`
/// module paths. kohya names a module by its diffusers path with every `.` replaced by `_`
/// (sd-scripts networks/lora.py: `lora_name = prefix + "." + name + "." + child_name`, then
/// `lora_name.replace(".", "_")`), which loses the boundaries inside these names; diffusers'
/// `_convert_unet_lora_key` / `_convert_text_encoder_lora_key` restore them by string
/// replacement. Matching whole segments (longest first) gives the same paths without its
/// `attn1.processor` legacy.
const SEGMENTS: &[&str] = &[
    // UNet
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "time_emb_proj",
    "conv_shortcut",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
    "linear_1",
    "linear_2",
    // CLIP text encoders
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "token_embedding",
    "position_embedding",
    "text_projection",
];

/// One-word segments of the same paths: a token outside both lists means a name this module
/// cannot map (SD 1.x original-checkpoint names: `input_blocks`, `middle_block`, `emb_layers`).
const WORDS: &[&str] = &[
    "attentions",
    "resnets",
    "attn1",
    "attn2",
    "ff",
    "net",
    "proj",
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "conv",
    "conv1",
    "conv2",
    "downsamplers",
    "upsamplers",
    "encoder",
    "layers",
    "mlp",
    "fc1",
    "fc2",
    "embeddings",
];

/// The diffusers module path of a kohya module name:
/// `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` ->
/// `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
/// `lora_te_text_model_encoder_layers_0_self_attn_q_proj` ->
/// `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`. `None` for a name with a
/// segment outside diffusers' UNet / CLIP vocabulary (SGM `input_blocks`-style names, which
/// need the UNet's config: [`sgm_to_diffusers`](super::sgm_to_diffusers)).
///
/// ```
/// use peft_lora::kohya::{Network, kohya_to_diffusers};
/// assert_eq!(
///     kohya_to_diffusers("lora_te2_text_model_encoder_layers_3_mlp_fc2", Network::TextEncoder2).as_deref(),
///     Some("text_encoder_2.text_model.encoder.layers.3.mlp.fc2")
/// );
/// assert_eq!(kohya_to_diffusers("lora_unet_input_blocks_1_1_proj_in", Network::Unet), None);
/// ```
pub fn kohya_to_diffusers(name: &str, network: Network) -> Option<String> {
    let rest = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"]
        .iter()
        .find_map(|p| name.strip_prefix(p))?;
    let tokens: Vec<&str> = rest.split('_').collect();
    let mut out = vec![network.component().to_string()];
    let mut i = 0;
    'tokens: while i < tokens.len() {
        // Longest multi-word segment first (`proj_in` before `proj`).
        for len in (2..=3).rev() {
            if i + len <= tokens.len() {
                let joined = tokens[i..i + len].join("_");
                if SEGMENTS.contains(&joined.as_str()) {
                    out.push(joined);
                    i += len;
                    continue 'tokens;
                }
            }
        }
        let token = tokens[i];
        let number = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
        if !(number || WORDS.contains(&token)) {
            return None;
        }
        out.push(token.to_string());
        i += 1;
    }
    Some(out.join("."))
}
