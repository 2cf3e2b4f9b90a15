//! SGM / LDM kohya names -> diffusers module paths. kohya sd-scripts trains SDXL on the original
//! (Stability "sgm") UNet, so SDXL LoRAs name modules `lora_unet_input_blocks_4_1_...`,
//! `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_...`; which diffusers block such a
//! name is depends on the UNet's `layers_per_block`. This follows diffusers 0.42's
//! `_maybe_map_sgm_blocks_to_diffusers(state_dict, unet_config, delimiter="_",
//! block_slice_pos=5)` and the renames of `_convert_unet_lora_key`
//! (loaders/lora_conversion_utils.py), which `load_lora_weights` applies when the pipeline's UNet
//! config is known.

use std::path::Path;

use super::{LoraFile, LoraFormat, Network, kohya_to_diffusers};

/// What [`sgm_to_diffusers`] needs of a diffusers UNet's `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetConfig {
    /// `layers_per_block`: resnets per down block (an up block has one more).
    pub layers_per_block: usize,
}

impl UnetConfig {
    /// Parse a `UNet2DConditionModel` `config.json` (only `layers_per_block` is read).
    ///
    /// ```
    /// let config = peft_lora::kohya::UnetConfig::from_json(r#"{"layers_per_block": 2}"#).unwrap();
    /// assert_eq!(config.layers_per_block, 2);
    /// ```
    pub fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let layers = value
            .get("layers_per_block")
            .ok_or("no `layers_per_block`")?;
        // diffusers allows a list (one count per block) only for its newer UNets; the SGM
        // mapping needs the single count.
        let layers_per_block = layers
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("`layers_per_block` {layers} is not a positive integer"))?;
        Ok(UnetConfig {
            layers_per_block: layers_per_block as usize,
        })
    }

    /// Read a `UNet2DConditionModel` `config.json` (`<pipeline>/unet/config.json`).
    pub fn read(path: impl AsRef<Path>) -> Result<Self, String> {
        let text = std::fs::read_to_string(path.as_ref()).map_err(|e| e.to_string())?;
        Self::from_json(&text)
    }
}

/// Names outside the block structure that diffusers' `_convert_unet_lora_key` maps directly.
const DIRECT: &[(&str, &str)] = &[
    ("input_blocks_0_0", "conv_in"),
    ("out_2", "conv_out"),
    ("time_embed_0", "time_embedding.linear_1"),
    ("time_embed_2", "time_embedding.linear_2"),
    ("label_emb_0_0", "add_embedding.linear_1"),
    ("label_emb_0_2", "add_embedding.linear_2"),
];

/// `_maybe_map_sgm_blocks_to_diffusers`' `inner_block_map`.
const INNER: [&str; 3] = ["resnets", "attentions", "upsamplers"];

/// Whether a name uses SGM block names (`input_blocks`, `middle_block`, `output_blocks`).
fn is_sgm(name: &str) -> bool {
    ["input_blocks", "middle_block", "output_blocks"]
        .iter()
        .any(|p| name.contains(p))
}

/// The diffusers module path of an SGM / LDM kohya UNet module name, for a UNet with `config`:
/// `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` ->
/// `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` (layers_per_block 2),
/// `lora_unet_middle_block_2_out_layers_3` -> `unet.mid_block.resnets.1.conv2`. Also
/// `input_blocks_0_0` (`conv_in`), `out_2` (`conv_out`), `time_embed_0` / `_2` and
/// `label_emb_0_0` / `_2`. `None` for other names, and for layers diffusers gives no module
/// name (`in_layers_0`, a group norm).
///
/// As diffusers: input block `i` is down block `(i - 1) / (layers_per_block + 1)`, its
/// `resnets` / `attentions` (second index 0 / 1) number `(i - 1) % (layers_per_block + 1)`, or
/// `downsamplers.0` for a name containing `op`; middle block 0 / 1 / 2 is `resnets.0` /
/// `attentions.0` / `resnets.1`; output block `i` is up block `i / (layers_per_block + 1)`,
/// second index 0 / 1 / 2 `resnets` / `attentions` numbered `i % (layers_per_block + 1)` or
/// `upsamplers.0`. diffusers' quirk is kept: an upsampler at second index 1 (an up block
/// without attentions) becomes `attentions.<n>.conv`, a path no UNet has. Inner renames:
/// `in_layers_2` -> `conv1`, `out_layers_3` -> `conv2`, `emb_layers_1` -> `time_emb_proj`,
/// `skip_connection` -> `conv_shortcut`, `op` -> `conv`. Names containing `text` are left to
/// diffusers' text-encoder path there, so `None` here.
///
/// ```
/// use peft_lora::kohya::{UnetConfig, sgm_to_diffusers};
/// let sdxl = UnetConfig { layers_per_block: 2 };
/// assert_eq!(
///     sgm_to_diffusers("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", &sdxl).as_deref(),
///     Some("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
/// );
/// assert_eq!(
///     sgm_to_diffusers("lora_unet_output_blocks_5_2_conv", &sdxl).as_deref(),
///     Some("unet.up_blocks.1.upsamplers.0.conv")
/// );
/// ```
pub fn sgm_to_diffusers(name: &str, config: &UnetConfig) -> Option<String> {
    let rest = name.strip_prefix("lora_unet_")?;
    if let Some((_, path)) = DIRECT.iter().find(|(sgm, _)| *sgm == rest) {
        return Some(format!("unet.{path}"));
    }
    if name.contains("text") || !is_sgm(rest) {
        return None;
    }
    let tokens: Vec<&str> = rest.split('_').collect();
    // `key.split("_")[:5][-1]` and `[5]` of the whole key: the block and inner indices.
    let index = |t: Option<&&str>| t.and_then(|t| t.parse::<usize>().ok());
    let block = index(tokens.get(2))?;
    let n = config.layers_per_block + 1;
    let mut mapped: Vec<String> = match (tokens[0], tokens[1]) {
        ("input", "blocks") => {
            let inner = index(tokens.get(3))?;
            // input_blocks_0 is conv_in only (mapped above).
            let i = block.checked_sub(1)?;
            let (kind, layer) = if name.contains("op") {
                ("downsamplers", 0)
            } else {
                (*INNER.get(inner)?, i % n)
            };
            vec![
                "down_blocks".into(),
                (i / n).to_string(),
                kind.into(),
                layer.to_string(),
            ]
        }
        ("middle", "block") => {
            let (kind, layer) = match block {
                0 => ("resnets", "0"),
                1 => ("attentions", "0"),
                2 => ("resnets", "1"),
                _ => return None,
            };
            vec!["mid_block".into(), kind.into(), layer.into()]
        }
        ("output", "blocks") => {
            let inner = index(tokens.get(3))?;
            let layer = if inner < 2 { block % n } else { 0 };
            vec![
                "up_blocks".into(),
                (block / n).to_string(),
                (*INNER.get(inner)?).into(),
                layer.to_string(),
            ]
        }
        _ => return None,
    };
    let tail = if tokens[0] == "middle" {
        &tokens[3..]
    } else {
        &tokens[4..]
    };
    let sampler = mapped[2].ends_with("samplers");
    // `_convert_unet_lora_key`'s renames of the resnet and sampler layers.
    let mut i = 0;
    while i < tail.len() {
        let rest = &tail[i..];
        let (word, used) = match rest {
            ["in", "layers", "2", ..] => ("conv1", 3),
            ["out", "layers", "3", ..] => ("conv2", 3),
            // `emb.layers` -> `time_emb_proj`, then the last `.<digits>` goes.
            ["emb", "layers", d, ..] if d.parse::<usize>().is_ok() => ("time_emb_proj", 3),
            ["skip", "connection", ..] => ("conv_shortcut", 2),
            ["op", ..] if sampler => ("conv", 1),
            [t, ..] => (*t, 1),
            [] => unreachable!("i < tail.len()"),
        };
        mapped.push(word.to_string());
        i += used;
    }
    kohya_to_diffusers(&format!("lora_unet_{}", mapped.join("_")), Network::Unet)
}

impl LoraFile {
    /// Give the file's SGM-named kohya UNet modules (`lora_unet_input_blocks_...`, which
    /// [`LoraFile::read`] leaves without a diffusers path) the diffusers paths a UNet with
    /// `config` gives them ([`sgm_to_diffusers`]). As diffusers, a file that mixes SGM names
    /// with diffusers block names (`down_blocks`, `mid_block`, `up_blocks`) keeps its SGM
    /// modules unmapped (diffusers drops them).
    ///
    /// ```
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/kohya/sgm_a.safetensors");
    /// use peft_lora::kohya::{LoraFile, UnetConfig};
    /// let lora = LoraFile::read(path).unwrap().with_unet_config(&UnetConfig { layers_per_block: 1 });
    /// let q = lora.module("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q").unwrap();
    /// assert_eq!(q.diffusers_path.as_deref(), Some("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"));
    /// ```
    pub fn with_unet_config(mut self, config: &UnetConfig) -> Self {
        if self.format != LoraFormat::Kohya {
            return self;
        }
        let names = || self.modules.iter().map(|m| m.name.as_str());
        let diffusers_blocks = names().any(|n| {
            !is_sgm(n)
                && ["down_blocks", "mid_block", "up_blocks"]
                    .iter()
                    .any(|p| n.contains(p))
        });
        let sgm = names().any(is_sgm);
        if sgm && diffusers_blocks {
            return self;
        }
        for module in &mut self.modules {
            if module.network == Network::Unet && module.diffusers_path.is_none() {
                module.diffusers_path = sgm_to_diffusers(&module.name, config);
            }
        }
        self
    }
}
