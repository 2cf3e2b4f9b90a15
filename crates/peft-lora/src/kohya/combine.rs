//! Combining kohya Stable Diffusion LoRA files into one, exactly: the ranks are concatenated
//! (sd-scripts `networks/merge_lora.py` with `--concat`, PEFT
//! `add_weighted_adapter(combination_type="cat")`), so the combined file's delta is the
//! weighted sum of the inputs' deltas, `Σ weight_i · (alpha_i / r_i) · up_i @ down_i`.
//!
//! For each module: down = the inputs' downs stacked along the rank axis (axis 0, `[r, in]` or
//! `[r, in, kh, kw]`), up = the inputs' ups, each times `weight_i · alpha_i / r_i`, stacked
//! along the rank axis (axis 1, `[out, r]` or `[out, r, 1, 1]`), and alpha = the new rank, so
//! the scale `alpha / r` is 1. A module that only some files adapt keeps only their parts.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use peft_core::atomic::{IoAt, write_file};
use safetensors::Dtype;
use safetensors::tensor::{TensorInfo, TensorView};

use super::header::{read_f32, read_header};
use super::{KohyaError, LoraFile, LoraFormat, ModuleKind};

/// Why a combine failed; every variant names the file(s) involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CombineError {
    /// A LoRA file that cannot be read or is not a valid SD LoRA file.
    #[error(transparent)]
    Lora(#[from] KohyaError),
    /// Reading or writing a file failed.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No input file.
    #[error("no LoRA file to combine")]
    NoInputs,
    /// A weight that is NaN or infinite.
    #[error("{}: weight {weight} is not a finite number", file.display())]
    BadWeight {
        /// The LoRA file.
        file: PathBuf,
        /// The weight given.
        weight: f64,
    },
    /// An input in diffusers naming: only kohya files are combined.
    #[error(
        "{}: a {format} file; only kohya (sd-scripts, `lora_unet_*.lora_down.weight`) files can be combined",
        file.display()
    )]
    NotKohya {
        /// The LoRA file.
        file: PathBuf,
        /// Its format.
        format: LoraFormat,
    },
    /// A DoRA module (`dora_scale`): its magnitude does not add up across files.
    #[error("{}: module `{module}` has a DoRA magnitude (dora_scale): DoRA files cannot be combined", file.display())]
    Dora {
        /// The LoRA file.
        file: PathBuf,
        /// The module.
        module: String,
    },
    /// Two files adapt one module with layers of different kinds or shapes.
    #[error(
        "module `{module}`: {} adapts it as {first}, {} as {second}; the files are not for the same model",
        first_file.display(),
        second_file.display()
    )]
    Conflict {
        /// The module, as named in the files.
        module: String,
        /// The first file adapting it.
        first_file: PathBuf,
        /// What the first file's module is (kind, in and out features).
        first: String,
        /// The other file.
        second_file: PathBuf,
        /// What the other file's module is.
        second: String,
    },
    /// A LoRA tensor in a dtype other than F16 / BF16 / F32 / F64.
    #[error("{}: `{key}` has dtype {dtype}; LoRA weights must be F16, BF16, F32 or F64", file.display())]
    LoraDtype {
        /// The LoRA file.
        file: PathBuf,
        /// The tensor.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// The combined file would be too large to build in memory.
    #[error("{}: the combined file would hold {bytes} bytes of weights, too many", output.display())]
    TooLarge {
        /// The output file.
        output: PathBuf,
        /// Its size.
        bytes: u128,
    },
}

impl CombineError {
    /// Whether the error is about the input (a bad file or weight) rather than a failed read or
    /// write.
    pub fn is_bad_input(&self) -> bool {
        match self {
            CombineError::Io { .. } => false,
            CombineError::Lora(KohyaError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            _ => true,
        }
    }
}

impl From<IoAt> for CombineError {
    fn from(e: IoAt) -> Self {
        CombineError::Io {
            file: e.path,
            source: e.source,
        }
    }
}

/// One input's part in a combine.
#[derive(Debug, Clone, PartialEq)]
pub struct CombinedLora {
    /// The LoRA file.
    pub file: PathBuf,
    /// Its weight.
    pub weight: f64,
    /// How many modules it has.
    pub modules: usize,
}

/// What [`combine`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct CombineReport {
    /// The file written.
    pub output: PathBuf,
    /// Each input, in the order given.
    pub loras: Vec<CombinedLora>,
    /// How many modules the combined file has.
    pub modules: usize,
    /// The largest rank of a combined module (the sum of its inputs' ranks).
    pub max_rank: usize,
    /// The dtype of the written weights (always `F32`).
    pub dtype: &'static str,
}

/// One input module to stack.
struct Part {
    lora: usize,
    down: TensorInfo,
    up: TensorInfo,
    rank: usize,
    /// `weight · alpha / rank`.
    scale: f64,
}

/// A module of the output and what it is made of.
struct Planned {
    kind: ModuleKind,
    in_features: usize,
    out_features: usize,
    parts: Vec<Part>,
}

fn describe(kind: ModuleKind, in_features: usize, out_features: usize) -> String {
    match kind {
        ModuleKind::Linear => format!("a linear layer {in_features} -> {out_features}"),
        ModuleKind::Conv { kernel } => format!(
            "a {}x{} convolution {in_features} -> {out_features} channels",
            kernel[0], kernel[1]
        ),
    }
}

/// The header of a safetensors file `LoraFile::read` accepted (read and checked again).
fn tensors_of(path: &Path) -> Result<(BTreeMap<String, TensorInfo>, u64), CombineError> {
    let (_, header) = read_header(path).map_err(|e| {
        e.into(
            |source| CombineError::Io {
                file: path.to_path_buf(),
                source,
            },
            |reason| {
                CombineError::Lora(KohyaError::Corrupt {
                    file: path.to_path_buf(),
                    reason,
                })
            },
        )
    })?;
    Ok((header.tensors, header.data_start))
}

/// Combine kohya LoRA files, each with its weight, into one kohya LoRA file at `output`
/// (written atomically), whose delta is exactly the weighted sum of theirs.
///
/// The output is always F32 (whatever the inputs' dtypes: the scaled ups of an F16 input would
/// lose precision in F16), named in kohya naming (`<module>.lora_down.weight`,
/// `.lora_up.weight`, `.alpha`). Inputs in diffusers naming are refused
/// ([`CombineError::NotKohya`]), as are DoRA modules and two files adapting one module with
/// layers of different kinds or shapes. Every file is read and checked (from its header)
/// before any weight is loaded.
///
/// ```no_run
/// use std::path::{Path, PathBuf};
/// let report = peft_lora::kohya::combine(
///     &[(PathBuf::from("style.safetensors"), 0.7), (PathBuf::from("detail.safetensors"), 0.5)],
///     Path::new("both.safetensors"),
/// )?;
/// println!("{} modules, rank up to {}", report.modules, report.max_rank);
/// # Ok::<(), peft_lora::kohya::CombineError>(())
/// ```
pub fn combine(loras: &[(PathBuf, f64)], output: &Path) -> Result<CombineReport, CombineError> {
    if loras.is_empty() {
        return Err(CombineError::NoInputs);
    }
    let mut plan: BTreeMap<String, Planned> = BTreeMap::new();
    let mut reports = Vec::with_capacity(loras.len());
    let mut headers = Vec::with_capacity(loras.len());
    for (index, (path, weight)) in loras.iter().enumerate() {
        if !weight.is_finite() {
            return Err(CombineError::BadWeight {
                file: path.clone(),
                weight: *weight,
            });
        }
        let lora = LoraFile::read(path)?;
        if lora.format != LoraFormat::Kohya {
            return Err(CombineError::NotKohya {
                file: path.clone(),
                format: lora.format,
            });
        }
        if let Some(m) = lora.modules.iter().find(|m| m.has_dora_scale) {
            return Err(CombineError::Dora {
                file: path.clone(),
                module: m.name.clone(),
            });
        }
        let (tensors, data_start) = tensors_of(path)?;
        for m in &lora.modules {
            let down_key = format!("{}.lora_down.weight", m.name);
            let up_key = format!("{}.lora_up.weight", m.name);
            let (Some(down), Some(up)) = (tensors.get(&down_key), tensors.get(&up_key)) else {
                return Err(KohyaError::Corrupt {
                    file: path.clone(),
                    reason: format!("module `{}` changed while read", m.name),
                }
                .into());
            };
            for (key, info) in [(&down_key, down), (&up_key, up)] {
                if !matches!(
                    info.dtype,
                    Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
                ) {
                    return Err(CombineError::LoraDtype {
                        file: path.clone(),
                        key: key.clone(),
                        dtype: format!("{:?}", info.dtype),
                    });
                }
            }
            let entry = plan.entry(m.name.clone()).or_insert_with(|| Planned {
                kind: m.kind,
                in_features: m.in_features,
                out_features: m.out_features,
                parts: Vec::new(),
            });
            if (entry.kind, entry.in_features, entry.out_features)
                != (m.kind, m.in_features, m.out_features)
            {
                let first = entry.parts.first().map_or(0, |p| p.lora);
                return Err(CombineError::Conflict {
                    module: m.name.clone(),
                    first_file: loras[first].0.clone(),
                    first: describe(entry.kind, entry.in_features, entry.out_features),
                    second_file: path.clone(),
                    second: describe(m.kind, m.in_features, m.out_features),
                });
            }
            entry.parts.push(Part {
                lora: index,
                down: down.clone(),
                up: up.clone(),
                rank: m.rank,
                scale: weight * m.scale(),
            });
        }
        reports.push(CombinedLora {
            file: path.clone(),
            weight: *weight,
            modules: lora.modules.len(),
        });
        headers.push(data_start);
    }

    // The output's size, from the headers, before anything is allocated.
    let mut total: u128 = 0;
    for planned in plan.values() {
        let rank: u128 = planned.parts.iter().map(|p| p.rank as u128).sum();
        let kernel = match planned.kind {
            ModuleKind::Linear => 1,
            ModuleKind::Conv { kernel } => (kernel[0] * kernel[1]) as u128,
        };
        total +=
            4 * rank * (planned.in_features as u128 * kernel + planned.out_features as u128) + 4;
    }
    if total > isize::MAX as u128 / 2 {
        return Err(CombineError::TooLarge {
            output: output.to_path_buf(),
            bytes: total,
        });
    }

    let mut files = loras
        .iter()
        .map(|(path, _)| {
            File::open(path).map_err(|source| CombineError::Io {
                file: path.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(plan.len() * 3);
    let mut max_rank = 0;
    for (name, planned) in &plan {
        let rank: usize = planned.parts.iter().map(|p| p.rank).sum();
        max_rank = max_rank.max(rank);
        let (out_f, in_f) = (planned.out_features, planned.in_features);
        let kernel = match planned.kind {
            ModuleKind::Linear => None,
            ModuleKind::Conv { kernel } => Some(kernel),
        };
        let inner = in_f * kernel.map_or(1, |k| k[0] * k[1]);
        let mut down = Vec::with_capacity(rank * inner);
        // up as [out, rank], filled column block by column block.
        let mut up = vec![0f32; out_f * rank];
        let mut offset = 0;
        for part in &planned.parts {
            let (path, _) = &loras[part.lora];
            let file = &mut files[part.lora];
            let io = |source| CombineError::Io {
                file: path.clone(),
                source,
            };
            down.extend(read_f32(file, headers[part.lora], &part.down).map_err(io)?);
            let part_up = read_f32(file, headers[part.lora], &part.up).map_err(io)?;
            for o in 0..out_f {
                for j in 0..part.rank {
                    up[o * rank + offset + j] =
                        (f64::from(part_up[o * part.rank + j]) * part.scale) as f32;
                }
            }
            offset += part.rank;
        }
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (down_shape, up_shape) = match kernel {
            None => (vec![rank, in_f], vec![out_f, rank]),
            Some([kh, kw]) => (vec![rank, in_f, kh, kw], vec![out_f, rank, 1, 1]),
        };
        out.push((format!("{name}.lora_down.weight"), down_shape, bytes(&down)));
        out.push((format!("{name}.lora_up.weight"), up_shape, bytes(&up)));
        out.push((
            format!("{name}.alpha"),
            Vec::new(),
            (rank as f32).to_le_bytes().to_vec(),
        ));
    }
    let views = out
        .iter()
        .map(|(key, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (key.clone(), view))
                .map_err(|e| CombineError::Io {
                    file: output.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = std::collections::HashMap::from([(
        "ss_network_module".to_string(),
        "networks.lora".to_string(),
    )]);
    let serialized =
        safetensors::serialize(views, Some(metadata)).map_err(|e| CombineError::Io {
            file: output.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    write_file(output, &serialized)?;
    Ok(CombineReport {
        output: output.to_path_buf(),
        loras: reports,
        modules: plan.len(),
        max_rank,
        dtype: "F32",
    })
}
