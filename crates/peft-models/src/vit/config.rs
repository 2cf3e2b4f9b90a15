//! ViT's `config.json` (transformers' `ViTConfig`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::parse_json;
use crate::config_checks::{activation, divides, epsilon, invalid, positive, unsupported};
use crate::error::Result;

fn default_eps() -> f64 {
    1e-12
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_image_size() -> Size2 {
    Size2::One(224)
}
fn default_patch_size() -> Size2 {
    Size2::One(16)
}
fn default_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_tanh() -> String {
    "tanh".into()
}

/// `image_size` / `patch_size`: one number (square) or `[height, width]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    /// Square.
    One(usize),
    /// `[height, width]`.
    Two([usize; 2]),
}

impl Size2 {
    /// `[height, width]`.
    pub fn hw(self) -> [usize; 2] {
        match self {
            Size2::One(n) => [n, n],
            Size2::Two(hw) => hw,
        }
    }
}

/// `ViTConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct VitConfig {
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP size.
    pub intermediate_size: usize,
    /// Activation (`gelu` = erf form).
    #[serde(default = "default_gelu")]
    pub hidden_act: String,
    /// LayerNorm epsilon (1e-12 for ViT).
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The image size the position table was built for.
    #[serde(default = "default_image_size")]
    pub image_size: Size2,
    /// Patch size (the patch convolution's kernel and stride).
    #[serde(default = "default_patch_size")]
    pub patch_size: Size2,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Whether query, key and value have biases.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Pooler width (`hidden_size` when absent or null).
    #[serde(default)]
    pub pooler_output_size: Option<usize>,
    /// Pooler activation (only `tanh` is implemented).
    #[serde(default = "default_tanh")]
    pub pooler_act: String,
}

impl VitConfig {
    /// Parse and check `raw`: sizes, head counts, the activations.
    pub fn parse(raw: &Value, file: &Path) -> Result<Self> {
        let c: Self = parse_json(raw, file)?;
        positive(file, "hidden_size", c.hidden_size)?;
        positive(file, "num_hidden_layers", c.num_hidden_layers)?;
        positive(file, "num_attention_heads", c.num_attention_heads)?;
        positive(file, "intermediate_size", c.intermediate_size)?;
        positive(file, "num_channels", c.num_channels)?;
        if let Some(p) = c.pooler_output_size {
            positive(file, "pooler_output_size", p)?;
        }
        divides(
            file,
            ("hidden_size", c.hidden_size),
            ("num_attention_heads", c.num_attention_heads),
        )?;
        epsilon(file, "layer_norm_eps", c.layer_norm_eps)?;
        activation(file, "hidden_act", &c.hidden_act)?;
        if c.pooler_act != "tanh" {
            return Err(unsupported(
                file,
                "pooler_act",
                format!("\"{}\"", c.pooler_act),
                "only the tanh pooler is implemented",
            ));
        }
        let (image, patch) = (c.image_size.hw(), c.patch_size.hw());
        for (i, side) in ["height", "width"].iter().enumerate() {
            if patch[i] == 0 {
                return Err(invalid(file, "patch_size", patch[i], "must be at least 1"));
            }
            if image[i] < patch[i] {
                return Err(invalid(
                    file,
                    "image_size",
                    image[i],
                    &format!(
                        "the image {side} must be at least the patch {side} ({})",
                        patch[i]
                    ),
                ));
            }
        }
        Ok(c)
    }

    /// `[height, width]` of the images the model reads.
    pub fn image_hw(&self) -> [usize; 2] {
        self.image_size.hw()
    }

    /// Patches per image (the patch convolution's output positions).
    pub fn num_patches(&self) -> usize {
        let ([h, w], [ph, pw]) = (self.image_size.hw(), self.patch_size.hw());
        (h / ph) * (w / pw)
    }

    /// The pooler's width.
    pub fn pooler_size(&self) -> usize {
        self.pooler_output_size.unwrap_or(self.hidden_size)
    }
}
