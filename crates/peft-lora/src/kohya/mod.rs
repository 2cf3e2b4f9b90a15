//! Stable Diffusion LoRA files from outside PEFT: kohya / sd-scripts files (`lora_unet_*`,
//! `lora_te_*`, `lora_te1_*` / `lora_te2_*` with `lora_down` / `lora_up` / `alpha`, LoCon
//! convolutions, `dora_scale`) and diffusers files (`unet.…lora.down.weight` or the PEFT-style
//! `unet.…lora_A.weight`, `text_encoder.…`, `text_encoder_2.…`), for SD 1.x / 2.x / SDXL UNets
//! and CLIP text encoders.
//!
//! [`LoraFile::read`] reads the safetensors header, checks every tensor's size and shape
//! against it, and reads only the `alpha` scalars, never the weights: describing a 200 MB file
//! costs its header. [`fuse`] adds the deltas of such files, each with a weight, into a
//! diffusers pipeline folder's weights, as diffusers' `fuse_lora` does, or into a single-file
//! SD checkpoint (original LDM / SGM layout: `model.diffusion_model.…`,
//! `cond_stage_model.…`, `conditioner.embedders.…`) named as diffusers' `from_single_file`
//! converts it.
//!
//! ```
//! use peft_lora::kohya::{LoraFile, LoraFormat};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/kohya/sd15_kohya.safetensors");
//! let lora = LoraFile::read(file)?;
//! assert_eq!(lora.format, LoraFormat::Kohya);
//! let q = lora.module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q").unwrap();
//! assert_eq!(q.diffusers_path.as_deref(), Some("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"));
//! assert_eq!(q.scale(), q.alpha / q.rank as f64);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::tensor::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;

mod combine;
mod error;
mod fuse;
mod fuse_types;
mod header;
mod ldm;
mod names;
mod sgm;
mod single_file;

pub use combine::{CombineError, CombineReport, CombinedLora, combine};
pub use error::KohyaError;
pub use fuse::fuse;
pub use fuse_types::{FUSE_COMPONENTS, FuseError, FuseReport, FusedComponent, FusedLora};
use header::{Header, read_header};
pub use names::kohya_to_diffusers;
use names::{Role, classify, diffusers_module_path};
pub use sgm::{UnetConfig, sgm_to_diffusers};

/// Which tool's naming a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraFormat {
    /// kohya-ss/sd-scripts (and LyCORIS LoCon): `lora_unet_<path>.lora_down.weight`,
    /// `.lora_up.weight`, `.alpha`, `.dora_scale`, module paths with `_` for `.`.
    Kohya,
    /// diffusers' own (pre-PEFT) format: `unet.<path>.lora.down.weight` / `.lora.up.weight`,
    /// `text_encoder.<path>.lora_linear_layer.down.weight`, attention processors'
    /// `<path>.processor.to_q_lora.down.weight`, optional `<path>.alpha`.
    Diffusers,
    /// What diffusers saves today (PEFT key names): `unet.<path>.lora_A.weight` / `.lora_B.weight`,
    /// optional `<path>.alpha` and `<path>.lora_magnitude_vector` (DoRA).
    PeftLike,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya (sd-scripts)",
            LoraFormat::Diffusers => "diffusers (lora.down / lora.up)",
            LoraFormat::PeftLike => "diffusers PEFT-style (lora_A / lora_B)",
        })
    }
}

/// The model a module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Network {
    /// The UNet (`lora_unet_`, `unet.`).
    Unet,
    /// The only text encoder of SD 1.x / 2.x (`lora_te_`; `text_encoder.` in a file without
    /// `text_encoder_2.`).
    TextEncoder,
    /// SDXL's first text encoder, CLIP ViT-L (`lora_te1_`; `text_encoder.` next to
    /// `text_encoder_2.`).
    TextEncoder1,
    /// SDXL's second text encoder, OpenCLIP ViT-bigG (`lora_te2_`, `text_encoder_2.`).
    TextEncoder2,
}

impl Network {
    /// The diffusers pipeline component: `unet`, `text_encoder` or `text_encoder_2`
    /// (`lora_te_` and `lora_te1_` both map to `text_encoder`, as in diffusers'
    /// `_convert_non_diffusers_lora_to_diffusers`, loaders/lora_conversion_utils.py).
    pub fn component(self) -> &'static str {
        match self {
            Network::Unet => "unet",
            Network::TextEncoder | Network::TextEncoder1 => "text_encoder",
            Network::TextEncoder2 => "text_encoder_2",
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Network::Unet => "unet",
            Network::TextEncoder => "text_encoder",
            Network::TextEncoder1 => "text_encoder_1",
            Network::TextEncoder2 => "text_encoder_2",
        })
    }
}

/// The layer a LoRA module adapts, as its tensor shapes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleKind {
    /// `nn.Linear`: down `[r, in]`, up `[out, r]`.
    Linear,
    /// `nn.Conv2d` (LoCon): down `[r, in, kh, kw]`, up `[out, r, 1, 1]`, as sd-scripts'
    /// `LoRAModule` builds them (networks/lora.py: the up conv is always 1x1).
    Conv {
        /// The down convolution's kernel `[kh, kw]` (that of the adapted layer).
        kernel: [usize; 2],
    },
}

/// One adapted layer of a LoRA file.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// The name as in the file, without the tensor suffix
    /// (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`,
    /// `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    pub name: String,
    /// The model it belongs to.
    pub network: Network,
    /// Linear or convolution.
    pub kind: ModuleKind,
    /// The rank `r` (down's first axis, up's second).
    pub rank: usize,
    /// `alpha`: the stored value, or `rank` when the file has none (or stores 0).
    pub alpha: f64,
    /// Whether the file stores an `alpha` for this module (a stored 0 counts as absent).
    pub alpha_stored: bool,
    /// Whether the module has a DoRA magnitude (`dora_scale`, `lora_magnitude_vector`).
    pub has_dora_scale: bool,
    /// Input features (channels, for a convolution) of the adapted layer.
    pub in_features: usize,
    /// Output features (channels) of the adapted layer.
    pub out_features: usize,
    /// The diffusers module path (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`),
    /// or `None` for a kohya name this module cannot map (SGM / original-checkpoint names
    /// such as `lora_unet_input_blocks_1_1_proj_in`, which need the UNet's config:
    /// [`LoraFile::with_unet_config`]; or segments it does not know).
    pub diffusers_path: Option<String>,
}

impl LoraModule {
    /// The LoRA scale `alpha / rank` (sd-scripts `LoRAModule.scale`, PEFT `lora_alpha / r`).
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// A parsed LoRA file: its format and modules (sorted by name).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    /// The file read.
    pub path: PathBuf,
    /// The naming the file uses.
    pub format: LoraFormat,
    /// The modules, sorted by name.
    pub modules: Vec<LoraModule>,
}

/// The tensors of one module, by role, before validation.
#[derive(Default)]
struct Parts<'a> {
    down: Option<(String, &'a TensorInfo)>,
    up: Option<(String, &'a TensorInfo)>,
    alpha: Option<(String, &'a TensorInfo)>,
    dora: bool,
}

impl LoraFile {
    /// Read and check a kohya or diffusers LoRA `.safetensors` file (header and `alpha`
    /// values only).
    ///
    /// ```
    /// # let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/kohya/sdxl_kohya.safetensors");
    /// let lora = peft_lora::kohya::LoraFile::read(path).unwrap();
    /// assert!(lora.modules.iter().any(|m| m.network == peft_lora::kohya::Network::TextEncoder2));
    /// ```
    pub fn read(path: impl AsRef<Path>) -> Result<Self, KohyaError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| KohyaError::Io {
            file: path.clone(),
            source,
        };
        let corrupt = |reason: String| KohyaError::Corrupt {
            file: path.clone(),
            reason,
        };
        let (
            mut file,
            Header {
                tensors,
                data_start,
            },
        ) = read_header(&path).map_err(|e| e.into(io, corrupt))?;
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        let mut format = None;
        let mut modules: BTreeMap<String, (Network, Parts<'_>)> = BTreeMap::new();
        for key in keys {
            let (this_format, module, network, role) =
                classify(key).map_err(|reason| KohyaError::UnknownKey {
                    file: path.clone(),
                    key: key.clone(),
                    reason,
                })?;
            match (format, this_format) {
                (_, None) => {}
                (None, Some(this)) => format = Some(this),
                (Some(first), Some(this_format)) if first != this_format => {
                    return Err(KohyaError::MixedFormats {
                        file: path.clone(),
                        first,
                        second: this_format,
                        key: key.clone(),
                    });
                }
                (Some(_), Some(_)) => {}
            }
            let entry = modules.entry(module).or_insert((network, Parts::default()));
            let slot = (key.clone(), &tensors[key]);
            match role {
                Role::Down => entry.1.down = Some(slot),
                Role::Up => entry.1.up = Some(slot),
                Role::Alpha => entry.1.alpha = Some(slot),
                Role::Dora => entry.1.dora = true,
            }
        }
        let format = format.ok_or_else(|| KohyaError::Empty { file: path.clone() })?;
        // diffusers names SDXL's first encoder `text_encoder` like SD 1.x's only one; the
        // presence of `text_encoder_2` tells them apart.
        let sdxl = modules
            .values()
            .any(|(network, _)| *network == Network::TextEncoder2);
        let mut out = Vec::with_capacity(modules.len());
        for (name, (mut network, parts)) in modules {
            if sdxl && network == Network::TextEncoder {
                network = Network::TextEncoder1;
            }
            out.push(build_module(
                &path, &mut file, data_start, format, name, network, parts,
            )?);
        }
        Ok(LoraFile {
            path,
            format,
            modules: out,
        })
    }

    /// The module named `name` (as in the file), if any.
    pub fn module(&self, name: &str) -> Option<&LoraModule> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// `alpha / rank` of the module named `name` (see [`LoraModule::scale`]).
    pub fn scale(&self, name: &str) -> Option<f64> {
        self.module(name).map(LoraModule::scale)
    }

    /// The networks the file adapts, each once, in [`Network`] order.
    pub fn networks(&self) -> Vec<Network> {
        let mut networks: Vec<Network> = self.modules.iter().map(|m| m.network).collect();
        networks.sort();
        networks.dedup();
        networks
    }
}

/// Check one module's tensors and read its alpha.
fn build_module(
    path: &Path,
    file: &mut File,
    data_start: u64,
    format: LoraFormat,
    name: String,
    network: Network,
    parts: Parts<'_>,
) -> Result<LoraModule, KohyaError> {
    let (down_suffix, up_suffix) = match format {
        LoraFormat::Kohya => (".lora_down.weight", ".lora_up.weight"),
        LoraFormat::Diffusers => (".lora.down.weight", ".lora.up.weight"),
        LoraFormat::PeftLike => (".lora_A.weight", ".lora_B.weight"),
    };
    let missing = |present: &str, missing_suffix: &str| KohyaError::MissingHalf {
        file: path.to_path_buf(),
        module: name.clone(),
        present: present.to_string(),
        missing: format!("{name}{missing_suffix}"),
    };
    let ((down_key, down), (up_key, up)) = match (&parts.down, &parts.up) {
        (Some(d), Some(u)) => (d, u),
        (Some((key, _)), None) => return Err(missing(key, up_suffix)),
        (None, Some((key, _))) => return Err(missing(key, down_suffix)),
        (None, None) => {
            // Only an alpha or a DoRA magnitude: neither half of the pair.
            let present = parts
                .alpha
                .as_ref()
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| format!("{name} (DoRA magnitude)"));
            return Err(missing(&present, down_suffix));
        }
    };
    let bad_shape = |key: &str, shape: &[usize], reason: &str| KohyaError::BadShape {
        file: path.to_path_buf(),
        key: key.to_string(),
        shape: shape.to_vec(),
        reason: reason.to_string(),
    };
    let (ds, us) = (down.shape.as_slice(), up.shape.as_slice());
    let kind = match (ds.len(), us.len()) {
        (2, 2) => ModuleKind::Linear,
        (4, 4) => {
            // The up projection of a LoCon module is a 1x1 convolution (sd-scripts
            // networks/lora.py `LoRAModule.__init__`: `Conv2d(self.lora_dim, out_dim, (1, 1))`).
            if us[2..] != [1, 1] {
                return Err(bad_shape(
                    up_key,
                    us,
                    "the up convolution of a LoRA module must be 1x1",
                ));
            }
            ModuleKind::Conv {
                kernel: [ds[2], ds[3]],
            }
        }
        _ => {
            return Err(bad_shape(
                down_key,
                ds,
                &format!(
                    "down and up must both be 2-D (linear) or both 4-D (convolution); up `{up_key}` has shape {us:?}"
                ),
            ));
        }
    };
    let rank = ds[0];
    if rank != us[1] {
        return Err(KohyaError::RankMismatch {
            file: path.to_path_buf(),
            module: name,
            down: rank,
            up: us[1],
            down_shape: ds.to_vec(),
            up_shape: us.to_vec(),
        });
    }
    if rank == 0 || ds[1] == 0 || us[0] == 0 || ds.contains(&0) {
        return Err(bad_shape(
            down_key,
            ds,
            "a LoRA module needs rank, in and out > 0",
        ));
    }
    // sd-scripts: "if alpha == 0 or None, alpha is rank (no scaling)" (networks/lora.py
    // `LoRAModule.__init__`), and `create_network_from_weights` fills a missing alpha with the
    // rank ("support old LoRA without alpha"); diffusers' converters default it to the rank too
    // (`_convert_kohya_flux_lora_to_diffusers`: `default_alpha = rank`).
    let stored = match &parts.alpha {
        Some((key, info)) => Some(read_alpha(path, file, data_start, key, info)?),
        None => None,
    };
    let (alpha, alpha_stored) = match stored {
        Some(a) if a != 0.0 => (a, true),
        _ => (rank as f64, false),
    };
    let diffusers_path = match format {
        LoraFormat::Kohya => kohya_to_diffusers(&name, network),
        LoraFormat::Diffusers | LoraFormat::PeftLike => Some(diffusers_module_path(&name)),
    };
    Ok(LoraModule {
        network,
        kind,
        rank,
        alpha,
        alpha_stored,
        has_dora_scale: parts.dora,
        in_features: ds[1],
        out_features: us[0],
        diffusers_path,
        name,
    })
}

/// Read one `alpha` scalar (after checking it is one float) from the data section.
fn read_alpha(
    path: &Path,
    file: &mut File,
    data_start: u64,
    key: &str,
    info: &TensorInfo,
) -> Result<f64, KohyaError> {
    let bad = || KohyaError::BadAlpha {
        file: path.to_path_buf(),
        key: key.to_string(),
        dtype: format!("{:?}", info.dtype),
        shape: info.shape.clone(),
    };
    // sd-scripts saves alpha as a 0-d tensor; some converters write shape [1].
    if info.shape.iter().product::<usize>() != 1 {
        return Err(bad());
    }
    let size = match info.dtype {
        Dtype::F16 | Dtype::BF16 => 2,
        Dtype::F32 => 4,
        Dtype::F64 => 8,
        _ => return Err(bad()),
    };
    let mut bytes = [0u8; 8];
    file.seek(SeekFrom::Start(data_start + info.data_offsets.0 as u64))
        .and_then(|_| file.read_exact(&mut bytes[..size]))
        .map_err(|source| KohyaError::Io {
            file: path.to_path_buf(),
            source,
        })?;
    let value = match info.dtype {
        Dtype::F16 => f16::from_le_bytes([bytes[0], bytes[1]]).to_f64(),
        Dtype::BF16 => bf16::from_le_bytes([bytes[0], bytes[1]]).to_f64(),
        Dtype::F32 => f64::from(f32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"))),
        _ => f64::from_le_bytes(bytes),
    };
    if !value.is_finite() {
        return Err(KohyaError::NonFiniteAlpha {
            file: path.to_path_buf(),
            key: key.to_string(),
            value,
        });
    }
    Ok(value)
}
