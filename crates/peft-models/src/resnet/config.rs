//! ResNet's `config.json` (transformers' `ResNetConfig`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::parse_json;
use crate::config_checks::{activation, invalid, positive, unsupported};
use crate::error::Result;

fn default_channels() -> usize {
    3
}
fn default_embedding() -> usize {
    64
}
fn default_hidden_sizes() -> Vec<usize> {
    vec![256, 512, 1024, 2048]
}
fn default_depths() -> Vec<usize> {
    vec![3, 4, 6, 3]
}
fn default_layer_type() -> String {
    "bottleneck".into()
}
fn default_relu() -> String {
    "relu".into()
}

/// The channel reduction of a bottleneck layer (transformers' `ResNetBottleNeckLayer`
/// `reduction`): its inner convolutions have `out_channels / 4` channels.
pub const BOTTLENECK_REDUCTION: usize = 4;

/// `ResNetConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResNetConfig {
    /// Input image channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Channels of the stem (the 7x7 convolution).
    #[serde(default = "default_embedding")]
    pub embedding_size: usize,
    /// Output channels of each stage.
    #[serde(default = "default_hidden_sizes")]
    pub hidden_sizes: Vec<usize>,
    /// Residual layers of each stage.
    #[serde(default = "default_depths")]
    pub depths: Vec<usize>,
    /// `basic` (two 3x3 convolutions) or `bottleneck` (1x1, 3x3, 1x1).
    #[serde(default = "default_layer_type")]
    pub layer_type: String,
    /// Activation of the stem and after each residual sum (`relu`).
    #[serde(default = "default_relu")]
    pub hidden_act: String,
    /// Whether the first stage downsamples (stride 2).
    #[serde(default)]
    pub downsample_in_first_stage: bool,
    /// Whether a bottleneck layer strides in its first 1x1 convolution instead of the 3x3.
    #[serde(default)]
    pub downsample_in_bottleneck: bool,
}

impl ResNetConfig {
    /// Whether the layers are bottlenecks (else basic).
    pub fn bottleneck(&self) -> bool {
        self.layer_type == "bottleneck"
    }

    /// Parse and check `raw`: sizes positive, one depth per stage, a known layer type and
    /// activation, bottleneck widths divisible into inner channels.
    pub fn parse(raw: &Value, file: &Path) -> Result<Self> {
        let c: Self = parse_json(raw, file)?;
        positive(file, "num_channels", c.num_channels)?;
        positive(file, "embedding_size", c.embedding_size)?;
        if c.hidden_sizes.is_empty() {
            return Err(invalid(
                file,
                "hidden_sizes",
                "[]",
                "at least one stage is needed",
            ));
        }
        if c.depths.len() != c.hidden_sizes.len() {
            return Err(invalid(
                file,
                "depths",
                format!("{:?}", c.depths),
                &format!(
                    "one depth per stage is needed ({} entries, as `hidden_sizes`)",
                    c.hidden_sizes.len()
                ),
            ));
        }
        for (i, (&size, &depth)) in c.hidden_sizes.iter().zip(&c.depths).enumerate() {
            positive(file, &format!("hidden_sizes[{i}]"), size)?;
            positive(file, &format!("depths[{i}]"), depth)?;
        }
        match c.layer_type.as_str() {
            "basic" => {}
            "bottleneck" => {
                if let Some((i, size)) = c
                    .hidden_sizes
                    .iter()
                    .enumerate()
                    .find(|(_, s)| **s < BOTTLENECK_REDUCTION)
                {
                    return Err(invalid(
                        file,
                        &format!("hidden_sizes[{i}]"),
                        size,
                        "a bottleneck stage needs at least 4 channels (its inner convolutions \
                         have a quarter of them)",
                    ));
                }
            }
            other => {
                return Err(unsupported(
                    file,
                    "layer_type",
                    format!("\"{other}\""),
                    "ResNet layers are \"basic\" or \"bottleneck\"",
                ));
            }
        }
        activation(file, "hidden_act", &c.hidden_act)?;
        Ok(c)
    }
}
