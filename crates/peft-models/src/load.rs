//! Loading Hugging Face safetensors (single file or shards) into our modules through
//! burn-store, with Hugging Face names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::DType;
use burn_store::{
    FloatCastAdapter, KeyRemapper, ModuleAdapter, ModuleContext, ModuleSnapshot,
    PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};

use crate::error::{ModelError, Result};
use crate::hub::shard_names;

/// The weight files of a model folder: `model.safetensors`, or the shards of
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok(shard_names(&index)?
            .into_iter()
            .map(|s| dir.join(s))
            .collect());
    }
    Err(ModelError::NotFound {
        id: dir.display().to_string(),
        reason: "no model.safetensors or model.safetensors.index.json in the folder".into(),
    })
}

/// All tensor names in the weight files, read from the safetensors headers only.
pub fn tensor_names(files: &[PathBuf]) -> Result<BTreeSet<String>> {
    Ok(tensor_shapes(files)?.into_keys().collect())
}

/// The shape of every tensor in the weight files, read from the safetensors headers only.
pub fn tensor_shapes(files: &[PathBuf]) -> Result<BTreeMap<String, Vec<usize>>> {
    use std::io::Read;
    let mut names = BTreeMap::new();
    for file in files {
        let io = |source| ModelError::Io {
            file: file.clone(),
            source,
        };
        let corrupt = |reason: String| ModelError::Weights {
            file: file.clone(),
            reason: format!("not a valid safetensors file: {reason}"),
        };
        let mut f = std::fs::File::open(file).map_err(io)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io)?;
        let len = u64::from_le_bytes(len);
        let size = f.metadata().map_err(io)?.len();
        if len > size.saturating_sub(8) || len > 100 << 20 {
            return Err(corrupt(format!(
                "header length {len} exceeds the file size {size}"
            )));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header).map_err(io)?;
        let value: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| corrupt(e.to_string()))?;
        let map = value
            .as_object()
            .ok_or_else(|| corrupt("the header is not a JSON object".into()))?;
        for (name, entry) in map.iter().filter(|(k, _)| *k != "__metadata__") {
            let shape = entry
                .get("shape")
                .and_then(serde_json::Value::as_array)
                .and_then(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                        .collect::<Option<Vec<usize>>>()
                })
                .ok_or_else(|| corrupt(format!("tensor `{name}` has no valid `shape`")))?;
            names.insert(name.clone(), shape);
        }
    }
    Ok(names)
}

/// The number of scalars of all tensors of `shapes` (saturating).
pub fn total_elements(shapes: &BTreeMap<String, Vec<usize>>) -> u128 {
    shapes
        .values()
        .map(|s| s.iter().fold(1u128, |n, d| n.saturating_mul(*d as u128)))
        .fold(0u128, u128::saturating_add)
}

/// PyTorch -> Burn conversion (transpose `nn.Linear` weights, norm `weight/bias` ->
/// `gamma/beta`), leaving the weights a family stores `[in, out]` already (GPT-2's `Conv1D`)
/// as stored.
#[derive(Clone)]
struct HfAdapter {
    in_out: fn(&str) -> bool,
}

impl std::fmt::Debug for HfAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HfAdapter")
    }
}

impl ModuleAdapter for HfAdapter {
    fn adapt(
        &self,
        tensor: burn_store::burn_pack::Tensor,
        ctx: ModuleContext<'_>,
    ) -> burn_store::burn_pack::Tensor {
        if (self.in_out)(&tensor.name) {
            return tensor;
        }
        PyTorchToBurnAdapter.adapt(tensor, ctx)
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        PyTorchToBurnAdapter.get_alternative_param_name(param_name, container_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Load `files` into `model`. `remap` rewrites checkpoint keys to module paths (regex, replacement);
/// `in_out` names the tensors stored `[in, out]` (kept untransposed); `may_be_missing` lists
/// module-path prefixes that may stay freshly initialized (a new classification head), with a
/// warning.
pub fn load_into<M: Module>(
    model: &mut M,
    files: &[PathBuf],
    remap: &[(String, String)],
    in_out: fn(&str) -> bool,
    may_be_missing: &[String],
) -> Result<()> {
    let remapper = KeyRemapper::from_patterns(remap.to_vec()).map_err(|e| ModelError::Weights {
        file: files.first().cloned().unwrap_or_default(),
        reason: format!("bad key pattern: {e}"),
    })?;
    let mut applied = BTreeSet::new();
    let mut missing: Option<BTreeSet<String>> = None;
    for file in files {
        let adapter = HfAdapter { in_out }.chain(FloatCastAdapter::to(DType::F32));
        let weights_error = |e: String| ModelError::Weights {
            file: file.clone(),
            reason: e,
        };
        // torchvision / PyTorch state dicts (`.pth`, `.pt`) through burn-store's PyTorch
        // reader, which reads the pickle as data and executes nothing.
        let result = if is_pickle(file) {
            // The reader transposes linear weights and renames norms itself
            // (PyTorchToBurnAdapter); the indices stay as written, which the key renames name.
            let mut store = PytorchStore::from_file(file.clone())
                .map_indices_contiguous(false)
                .remap(remapper.clone())
                .allow_partial(true)
                .validate(false);
            model
                .load_from(&mut store)
                .map_err(|e| weights_error(e.to_string()))?
        } else {
            // Mismatches come back in the result (checked below), not as one opaque error.
            let mut store = SafetensorsStore::from_file(file.clone())
                .with_from_adapter(adapter)
                .remap(remapper.clone())
                .allow_partial(true)
                .validate(false);
            model
                .load_from(&mut store)
                .map_err(|e| weights_error(e.to_string()))?
        };
        // A new head of another class count than the checkpoint's (fine-tuning an ImageNet
        // classifier on 10 digits) starts fresh, as transformers' `ignore_mismatched_sizes`
        // does; any other mismatch is an error.
        let fresh = |path: &str| may_be_missing.iter().any(|p| path.starts_with(p.as_str()));
        for err in &result.errors {
            match err {
                burn_store::ApplyError::ShapeMismatch {
                    path,
                    expected,
                    found,
                } if fresh(path) => log::warn!(
                    "{}: `{path}` is {:?} in the checkpoint and {:?} in the model (another \
                     class count): newly initialized; train it before use",
                    file.display(),
                    found.as_slice(),
                    expected.as_slice()
                ),
                err => {
                    return Err(ModelError::Weights {
                        file: file.clone(),
                        reason: format!("{err}"),
                    });
                }
            }
        }
        for unused in &result.unused {
            log::debug!(
                "{}: tensor `{unused}` is not used by this model",
                file.display()
            );
        }
        applied.extend(result.applied.iter().cloned());
        let here: BTreeSet<String> = result.missing.iter().map(|(p, _)| p.clone()).collect();
        missing = Some(match missing {
            None => here,
            Some(m) => m.intersection(&here).cloned().collect(),
        });
    }
    let missing: Vec<String> = missing
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !applied.contains(p))
        .collect();
    let (allowed, fatal): (Vec<_>, Vec<_>) = missing.into_iter().partition(|p| {
        may_be_missing
            .iter()
            .any(|prefix| p.starts_with(prefix.as_str()))
    });
    if !fatal.is_empty() {
        return Err(ModelError::Weights {
            file: files.first().cloned().unwrap_or_default(),
            reason: format!(
                "{} tensor(s) the model needs are missing, e.g. {}",
                fatal.len(),
                fatal.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    if !allowed.is_empty() {
        log::warn!(
            "newly initialized (not in the checkpoint): {}; train them before use",
            allowed.join(", ")
        );
    }
    Ok(())
}

/// Whether `file` is a PyTorch pickle (`.pth`, `.pt`) rather than safetensors.
pub fn is_pickle(file: &Path) -> bool {
    matches!(
        file.extension().and_then(|e| e.to_str()),
        Some("pth" | "pt")
    )
}
