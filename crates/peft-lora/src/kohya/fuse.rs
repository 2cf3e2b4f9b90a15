//! Fusing kohya / diffusers Stable Diffusion LoRA files into a diffusers pipeline folder, as
//! diffusers' `pipe.load_lora_weights(file, adapter_name=..)` for each file, then
//! `pipe.set_adapters([..], adapter_weights=[..])` and `pipe.fuse_lora()` do: each adapted
//! weight becomes `W + Σ weight · (alpha / r) · up @ down` (PEFT `LoraLayer.merge` /
//! `get_delta_weight`, with the scale `set_adapters` sets: `weight · lora_alpha / r`). For a
//! LoCon convolution, down is `[r, in, kh, kw]` and up `[out, r, 1, 1]`, and the delta is
//! `(up.reshape(out, r) @ down.reshape(r, in·kh·kw)).reshape(out, in, kh, kw)`.
//!
//! The component files (`unet/diffusion_pytorch_model.safetensors`,
//! `text_encoder/model.safetensors`, `text_encoder_2/model.safetensors`) are written back with
//! the same header (tensor names, order, dtypes, metadata) and the fused weights rewritten in
//! place, in their own dtype (the sum is formed in f32 and rounded once); every other file of
//! the folder is copied unchanged. The output folder appears whole or not at all
//! ([`peft_core::atomic::StagedDir`]).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use peft_core::atomic::{Previous, StagedDir};
use safetensors::Dtype;
use safetensors::tensor::TensorInfo;

use super::fuse_types::{FUSE_COMPONENTS, FuseError, FuseReport, FusedComponent, FusedLora};
use super::header::{self, Header, from_f32, read_bytes, to_f32};
use super::{KohyaError, LoraFile, LoraFormat, LoraModule, ModuleKind, Network, UnetConfig};

/// Read and check a safetensors header ([`header::read_header`](super::header::read_header)),
/// its failures as the caller's errors.
fn read_header(
    path: &Path,
    corrupt: &dyn Fn(String) -> FuseError,
    io: &dyn Fn(std::io::Error) -> FuseError,
) -> Result<Header, FuseError> {
    header::read_header(path)
        .map(|(_, header)| header)
        .map_err(|e| e.into(io, corrupt))
}

/// Read a model weights file's header, its failures as [`FuseError::CorruptModel`] / `Io`.
pub(super) fn read_model_header(path: &Path) -> Result<Header, FuseError> {
    let file = || path.to_path_buf();
    read_header(
        path,
        &|reason| FuseError::CorruptModel {
            file: file(),
            reason,
        },
        &|source| FuseError::Io {
            file: file(),
            source,
        },
    )
}

/// A component weights file of the model folder, or the single-file checkpoint.
pub(super) struct Component {
    pub(super) name: &'static str,
    pub(super) relative: PathBuf,
    pub(super) path: PathBuf,
    pub(super) header: Header,
}

/// Where a module's delta goes: a component (index), its tensor, and a block of its rows
/// (`(first row, rows)`; `None` for the whole tensor).
pub(super) type Located = (usize, String, Option<(usize, usize)>);

/// What [`plan`] decided: per component, per tensor, the modules to add (in the order of the
/// LoRA files); each LoRA file's report and data-section start.
pub(super) struct Plan {
    pub(super) ops: Vec<BTreeMap<String, Vec<Op>>>,
    pub(super) reports: Vec<FusedLora>,
    lora_starts: Vec<u64>,
}

/// One module of one LoRA file to add onto one weight.
pub(super) struct Op {
    lora: usize,
    /// The diffusers component of the module (`unet`, `text_encoder`, `text_encoder_2`).
    pub(super) component: &'static str,
    /// The first row of the weight the delta adds onto (a q / k / v block of a fused
    /// `in_proj_weight`; 0 otherwise).
    row: usize,
    down: TensorInfo,
    up: TensorInfo,
    rank: usize,
    out: usize,
    /// `in · kh · kw`.
    inner: usize,
    /// `weight · alpha / rank`.
    scale: f32,
}

/// The LoRA file's keys of a module's down and up projections.
fn pair_keys(
    format: LoraFormat,
    name: &str,
    tensors: &BTreeMap<String, TensorInfo>,
) -> Option<(String, String)> {
    let candidates: &[(&str, &str)] = match format {
        LoraFormat::Kohya => &[(".lora_down.weight", ".lora_up.weight")],
        LoraFormat::PeftLike => &[(".lora_A.weight", ".lora_B.weight")],
        LoraFormat::Diffusers => &[
            (".lora.down.weight", ".lora.up.weight"),
            (
                ".lora_linear_layer.down.weight",
                ".lora_linear_layer.up.weight",
            ),
            ("_lora.down.weight", "_lora.up.weight"),
        ],
    };
    candidates.iter().find_map(|(down, up)| {
        let (down, up) = (format!("{name}{down}"), format!("{name}{up}"));
        (tensors.contains_key(&down) && tensors.contains_key(&up)).then_some((down, up))
    })
}

/// The tensor a module adapts in `component`: `<path>.weight`, where a text encoder saved by
/// transformers 5 has no `text_model.` wrapper in its names.
fn target_tensor(component: &Component, path: &str) -> Option<String> {
    let direct = format!("{path}.weight");
    if component.header.tensors.contains_key(&direct) {
        return Some(direct);
    }
    let flat = path.strip_prefix("text_model.")?;
    let flat = format!("{flat}.weight");
    (component.name != "unet" && component.header.tensors.contains_key(&flat)).then_some(flat)
}

fn float_dtype(dtype: Dtype, lora: bool) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) || (lora && dtype == Dtype::F64)
}

/// A path made absolute without requiring it to exist (its parent is resolved if it exists).
pub(super) fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

/// Extensions of weights files: beside a fused component file, another one (a `fp16` variant, a
/// `.bin` copy) would hold the unfused weights, so it is left out of the output.
const WEIGHT_EXTENSIONS: [&str; 6] = ["safetensors", "bin", "ckpt", "pt", "pth", "msgpack"];

/// Copy every file under `from` to `to` (following symbolic links, as a Hugging Face cache
/// snapshot's are), except the fused component files `fused` (relative paths) and the other
/// weights files in their folders, which are listed in `dropped`; returns how many were copied.
fn copy_tree(
    from: &Path,
    to: &Path,
    relative: &Path,
    fused: &[PathBuf],
    dropped: &mut Vec<PathBuf>,
) -> Result<usize, FuseError> {
    let io = |file: &Path| {
        let file = file.to_path_buf();
        move |source| FuseError::Io { file, source }
    };
    let dir = from.join(relative);
    fs::create_dir_all(to.join(relative)).map_err(io(&to.join(relative)))?;
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(io(&dir))?
        .collect::<Result<_, _>>()
        .map_err(io(&dir))?;
    entries.sort_by_key(|e| e.file_name());
    let mut copied = 0;
    for entry in entries {
        let rel = relative.join(entry.file_name());
        let meta = fs::metadata(entry.path()).map_err(io(&entry.path()))?;
        let stale_weights = fused.iter().any(|f| f.parent() == Some(relative))
            && rel
                .extension()
                .is_some_and(|e| WEIGHT_EXTENSIONS.iter().any(|w| e == *w));
        if meta.is_dir() {
            copied += copy_tree(from, to, &rel, fused, dropped)?;
        } else if !fused.contains(&rel) {
            if stale_weights {
                dropped.push(rel);
            } else {
                fs::copy(entry.path(), to.join(&rel)).map_err(io(&entry.path()))?;
                copied += 1;
            }
        }
    }
    Ok(copied)
}

/// Fuse LoRA files, each with its weight, into the diffusers pipeline folder `model` and write
/// the result to `output` (replaced whole if it holds a diffusers model already); or, when
/// `model` is a file, into that single-file SD checkpoint (original LDM / SGM layout, as
/// diffusers' `from_single_file` reads it: its tensors found under the names diffusers'
/// conversion gives them, the UNet's `layers_per_block` taken from its blocks), written to the
/// file `output` with the same header (tensor names, order, dtypes, metadata) and only the fused
/// tensors rewritten, atomically.
///
/// Every LoRA file is read and every module checked against the model (DoRA modules refused,
/// shapes compared, a file that matches nothing refused) before anything is written. Modules
/// that match no weight are skipped and listed in the report, as diffusers skips them.
/// SGM-named kohya UNet modules (`lora_unet_input_blocks_...`, SDXL files) are placed with the
/// model's `unet/config.json` ([`LoraFile::with_unet_config`]; a single file's
/// `layers_per_block` comes from its key set); without that file they match nothing.
///
/// ```no_run
/// use std::path::{Path, PathBuf};
/// let report = peft_lora::kohya::fuse(
///     Path::new("sd15"),
///     &[(PathBuf::from("style.safetensors"), 0.7), (PathBuf::from("detail.safetensors"), 0.5)],
///     Path::new("sd15-fused"),
/// )?;
/// println!("{} weights changed", report.components.iter().map(|c| c.tensors).sum::<usize>());
/// # Ok::<(), peft_lora::kohya::FuseError>(())
/// ```
pub fn fuse(
    model: &Path,
    loras: &[(PathBuf, f64)],
    output: &Path,
) -> Result<FuseReport, FuseError> {
    if model.is_file() {
        return super::single_file::fuse_file(model, loras, output);
    }
    let model_abs = resolved(model);
    let output_abs = resolved(output);
    if output_abs.starts_with(&model_abs) || model_abs.starts_with(&output_abs) {
        return Err(FuseError::OutputInsideModel {
            output: output.to_path_buf(),
            model: model.to_path_buf(),
        });
    }
    if let Ok(meta) = fs::metadata(output) {
        let empty = meta.is_dir()
            && fs::read_dir(output)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !meta.is_dir() || !(empty || output.join("model_index.json").is_file()) {
            return Err(FuseError::OutputNotAModel {
                output: output.to_path_buf(),
            });
        }
    }

    let mut components = Vec::new();
    for (name, file) in FUSE_COMPONENTS {
        let relative = Path::new(name).join(file);
        let path = model.join(&relative);
        if !path.is_file() {
            continue;
        }
        let header = read_model_header(&path)?;
        components.push(Component {
            name,
            relative,
            path,
            header,
        });
    }
    if components.is_empty() {
        return Err(FuseError::NoComponents {
            dir: model.to_path_buf(),
        });
    }

    // SGM-named kohya UNet modules (`lora_unet_input_blocks_...`) need the UNet's
    // `layers_per_block`, as diffusers' `load_lora_weights` reads it from `unet.config`; a
    // config that does not give it is an error only for a file with such modules.
    let unet_config_path = model.join("unet").join("config.json");
    let unet_config = unet_config_path
        .is_file()
        .then(|| UnetConfig::read(&unet_config_path));
    let plan = plan(
        &components,
        loras,
        model,
        unet_config
            .as_ref()
            .map(|c| (unet_config_path.as_path(), c)),
        &|module| locate(&components, module),
    )?;

    let staged = StagedDir::create(output)?;
    let skip: Vec<PathBuf> = components
        .iter()
        .zip(&plan.ops)
        .filter(|(_, p)| !p.is_empty())
        .map(|(c, _)| c.relative.clone())
        .collect();
    let mut dropped_files = Vec::new();
    let copied_files = copy_tree(
        model,
        staged.path(),
        Path::new(""),
        &skip,
        &mut dropped_files,
    )?;
    let mut written = Vec::new();
    for (component, ops) in components.iter().zip(&plan.ops) {
        if ops.is_empty() {
            continue;
        }
        let dest = staged.path().join(&component.relative);
        let dtypes = rewrite(component, ops, &dest, loras, &plan)?;
        written.push(FusedComponent {
            component: component.name.to_string(),
            file: component.relative.clone(),
            tensors: ops.len(),
            dtypes,
        });
    }
    staged.commit(Previous::Replace)?;
    Ok(FuseReport {
        output: output.to_path_buf(),
        loras: plan.reports,
        components: written,
        copied_files,
        dropped_files,
    })
}

/// Read every LoRA file and place each module on a weight of `components` with `locate`
/// (after giving SGM-named UNet modules their diffusers paths with `unet_config`, read from
/// the file named with it): shapes and dtypes checked, DoRA refused, a file that matches
/// nothing refused. Nothing is written.
pub(super) fn plan(
    components: &[Component],
    loras: &[(PathBuf, f64)],
    model: &Path,
    unet_config: Option<(&Path, &Result<UnetConfig, String>)>,
    locate: &dyn Fn(&LoraModule) -> Option<Located>,
) -> Result<Plan, FuseError> {
    let mut ops: Vec<BTreeMap<String, Vec<Op>>> =
        components.iter().map(|_| BTreeMap::new()).collect();
    let mut reports = Vec::with_capacity(loras.len());
    let mut lora_starts = Vec::with_capacity(loras.len());
    for (index, (path, weight)) in loras.iter().enumerate() {
        if !weight.is_finite() {
            return Err(FuseError::BadWeight {
                file: path.clone(),
                weight: *weight,
            });
        }
        let mut lora = LoraFile::read(path)?;
        let unplaced_unet = lora
            .modules
            .iter()
            .any(|m| m.network == Network::Unet && m.diffusers_path.is_none());
        match unet_config {
            Some((_, Ok(config))) => lora = lora.with_unet_config(config),
            Some((config_path, Err(reason))) if unplaced_unet => {
                return Err(FuseError::CorruptModel {
                    file: config_path.to_path_buf(),
                    reason: reason.clone(),
                });
            }
            _ => {}
        }
        if let Some(m) = lora.modules.iter().find(|m| m.has_dora_scale) {
            return Err(FuseError::Dora {
                file: path.clone(),
                module: m.name.clone(),
            });
        }
        let header = read_header(
            path,
            &|reason| {
                FuseError::from(KohyaError::Corrupt {
                    file: path.clone(),
                    reason,
                })
            },
            &|source| {
                FuseError::from(KohyaError::Io {
                    file: path.clone(),
                    source,
                })
            },
        )?;
        let mut report = FusedLora {
            file: path.clone(),
            weight: *weight,
            fused: 0,
            skipped: Vec::new(),
        };
        let mut example = None;
        for module in &lora.modules {
            let Some((c, tensor, rows)) = locate(module) else {
                if example.is_none() {
                    example = Some(format!(
                        "{} -> {}",
                        module.name,
                        module
                            .diffusers_path
                            .as_deref()
                            .map(|p| format!("{p}.weight"))
                            .unwrap_or_else(|| "no diffusers name".into())
                    ));
                }
                report.skipped.push(module.name.clone());
                continue;
            };
            let component = &components[c];
            let info = &component.header.tensors[&tensor];
            if !float_dtype(info.dtype, false) {
                return Err(FuseError::ModelDtype {
                    file: component.path.clone(),
                    tensor,
                    dtype: format!("{:?}", info.dtype),
                });
            }
            let delta_shape = match module.kind {
                ModuleKind::Linear => vec![module.out_features, module.in_features],
                ModuleKind::Conv { kernel } => vec![
                    module.out_features,
                    module.in_features,
                    kernel[0],
                    kernel[1],
                ],
            };
            // A block of rows (q / k / v of a fused projection) has that many rows.
            let mut expected = info.shape.clone();
            if let (Some((_, n)), Some(first)) = (rows, expected.first_mut()) {
                *first = n;
            }
            if expected != delta_shape {
                let tensor = match rows {
                    Some((first, n)) => format!("{tensor}[{first}..{}]", first + n),
                    None => tensor,
                };
                return Err(FuseError::ShapeMismatch {
                    file: path.clone(),
                    module: module.name.clone(),
                    component: module.network.component(),
                    tensor,
                    expected: expected.into(),
                    found: delta_shape.into(),
                });
            }
            let (down_key, up_key) = pair_keys(lora.format, &module.name, &header.tensors)
                .ok_or_else(|| KohyaError::Corrupt {
                    file: path.clone(),
                    reason: format!("module `{}`: down / up tensors not found", module.name),
                })?;
            for key in [&down_key, &up_key] {
                let dtype = header.tensors[key].dtype;
                if !float_dtype(dtype, true) {
                    return Err(FuseError::LoraDtype {
                        file: path.clone(),
                        key: key.clone(),
                        dtype: format!("{dtype:?}"),
                    });
                }
            }
            let inner = delta_shape[1..].iter().product();
            ops[c].entry(tensor).or_default().push(Op {
                lora: index,
                component: module.network.component(),
                row: rows.map_or(0, |(first, _)| first),
                down: header.tensors[&down_key].clone(),
                up: header.tensors[&up_key].clone(),
                rank: module.rank,
                out: module.out_features,
                inner,
                scale: (weight * module.scale()) as f32,
            });
            report.fused += 1;
        }
        if report.fused == 0 {
            return Err(FuseError::NoMatch {
                file: path.clone(),
                model: model.to_path_buf(),
                modules: lora.modules.len(),
                example: example.unwrap_or_default(),
            });
        }
        reports.push(report);
        lora_starts.push(header.data_start);
    }
    Ok(Plan {
        ops,
        reports,
        lora_starts,
    })
}

/// Copy `component`'s file to `dest` and add the deltas of `ops` onto its tensors there, each
/// rewritten in place in its own dtype; returns those dtypes (each once).
pub(super) fn rewrite(
    component: &Component,
    ops: &BTreeMap<String, Vec<Op>>,
    dest: &Path,
    loras: &[(PathBuf, f64)],
    plan: &Plan,
) -> Result<Vec<String>, FuseError> {
    let dest_io = |source| FuseError::Io {
        file: dest.to_path_buf(),
        source,
    };
    fs::copy(&component.path, dest).map_err(|source| FuseError::Io {
        file: component.path.clone(),
        source,
    })?;
    let mut out = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dest)
        .map_err(dest_io)?;
    let mut lora_files = Vec::with_capacity(loras.len());
    for (path, _) in loras {
        lora_files.push(File::open(path).map_err(|source| KohyaError::Io {
            file: path.clone(),
            source,
        })?);
    }
    let mut dtypes: Vec<String> = Vec::new();
    for (tensor, tensor_ops) in ops {
        let info = &component.header.tensors[tensor];
        let mut weights = to_f32(
            &read_bytes(&mut out, component.header.data_start, info).map_err(dest_io)?,
            info.dtype,
        );
        for op in tensor_ops {
            let (path, _) = &loras[op.lora];
            let lora_io = |source| {
                FuseError::from(KohyaError::Io {
                    file: path.clone(),
                    source,
                })
            };
            let file = &mut lora_files[op.lora];
            let start = plan.lora_starts[op.lora];
            let down = to_f32(
                &read_bytes(file, start, &op.down).map_err(lora_io)?,
                op.down.dtype,
            );
            let up = to_f32(
                &read_bytes(file, start, &op.up).map_err(lora_io)?,
                op.up.dtype,
            );
            add_delta(&mut weights, &up, &down, op);
        }
        out.seek(SeekFrom::Start(
            component.header.data_start + info.data_offsets.0 as u64,
        ))
        .and_then(|_| out.write_all(&from_f32(&weights, info.dtype)))
        .map_err(dest_io)?;
        let dtype = format!("{:?}", info.dtype);
        if !dtypes.contains(&dtype) {
            dtypes.push(dtype);
        }
    }
    out.sync_all().map_err(dest_io)?;
    Ok(dtypes)
}

/// The component and tensor a module adapts, if the model has it.
fn locate(components: &[Component], module: &LoraModule) -> Option<Located> {
    let path = module.diffusers_path.as_deref()?;
    let name = module.network.component();
    let path = path.strip_prefix(name)?.strip_prefix('.')?;
    let c = components.iter().position(|c| c.name == name)?;
    target_tensor(&components[c], path).map(|t| (c, t, None))
}

/// `weights[row..row + out] += scale · (up [out, r] @ down [r, inner])`, the product formed
/// first as PEFT's `get_delta_weight` forms it.
fn add_delta(weights: &mut [f32], up: &[f32], down: &[f32], op: &Op) {
    let (r, k) = (op.rank, op.inner);
    let weights = &mut weights[op.row * k..(op.row + op.out) * k];
    let mut row = vec![0f32; k];
    for o in 0..op.out {
        row.fill(0.0);
        for j in 0..r {
            let u = up[o * r + j];
            for (acc, d) in row.iter_mut().zip(&down[j * k..(j + 1) * k]) {
                *acc += u * d;
            }
        }
        for (w, d) in weights[o * k..(o + 1) * k].iter_mut().zip(&row) {
            *w += d * op.scale;
        }
    }
}
