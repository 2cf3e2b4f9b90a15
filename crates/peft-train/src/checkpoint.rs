//! Checkpoints: the adapter bundle in PEFT format plus what resuming needs (every trainable
//! tensor by module path, including a prefix projection MLP PEFT does not save; optimizer
//! moments; step, data position, best metric). Written atomically through
//! [`peft_core::atomic`]; the last `keep_last` are kept.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};
use peft_core::atomic::{Previous, StagedDir};
use peft_core::bundle::{TensorFile, encode_safetensors};
use peft_core::{Adaptable, PeftModel};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::{AdamW, trainable_paths, trainable_shapes};

/// Where the run stands; saved as `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// Index of the next batch within the epoch.
    pub batch_in_epoch: usize,
    /// Best evaluation metric so far.
    pub best_metric: Option<f64>,
    /// Step of the best evaluation.
    pub best_step: Option<u64>,
    /// Evaluations since the last improvement (early stopping).
    pub evals_without_improvement: usize,
    /// Training loss at each optimizer step.
    pub losses: Vec<f64>,
    /// The run that wrote it ([`crate::run::record`]); absent in checkpoints written before
    /// runs were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<serde_json::Value>,
}

const ADAPTER_STATE: &str = "adapter_state.safetensors";
const OPTIMIZER_STATE: &str = "optimizer.safetensors";
const TRAINER_STATE: &str = "trainer_state.json";

fn io(file: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        file: file.to_path_buf(),
        source,
    }
}

/// The folder name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The first of `tensors` (by name) that holds a value that is not finite.
fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a TensorData)>,
) -> Option<String> {
    tensors
        .into_iter()
        .find(|(_, data)| data.iter::<f32>().any(|v| !v.is_finite()))
        .map(|(name, _)| name.clone())
}

/// The module path of the first trainable parameter of `model` that holds a value that is not
/// finite (a save refuses such a model).
pub fn non_finite_parameter<M: Adaptable + Module>(model: &PeftModel<M>) -> Option<String> {
    let params: BTreeMap<String, TensorData> = trainable_named_values(model);
    first_non_finite(&params)
}

/// The trainable parameters of `model` by module path.
pub fn trainable_named_values<M: Adaptable + Module>(
    model: &PeftModel<M>,
) -> BTreeMap<String, TensorData> {
    trainable_paths(model.model(), model.trainable_param_ids())
        .into_iter()
        .map(|(_, path, _)| path)
        .zip(trainable_values(model))
        .collect()
}

/// Save a checkpoint under `root` and prune to the last `keep_last`. Returns its folder.
///
/// A parameter or optimizer moment that is not finite is [`TrainError::NonFiniteParameter`]
/// and nothing is written: no checkpoint ever holds one, so the newest checkpoint is always
/// one a resume can continue from.
pub fn save<M: Adaptable + Module>(
    root: &Path,
    model: &PeftModel<M>,
    adapters: &[String],
    optim: &AdamW,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    let params = trainable_named_values(model);
    let (step, mut moments) = optim.state();
    if let Some(parameter) = first_non_finite(&params).or_else(|| first_non_finite(&moments)) {
        return Err(TrainError::NonFiniteParameter {
            step: Some(state.step),
            parameter,
            last_checkpoint: latest(root),
        });
    }
    let dest = root.join(checkpoint_name(state.step));
    // One atomic-save helper for the whole project: staged beside `dest`, fsynced, swapped in.
    let staged = StagedDir::create(&dest)?;
    let tmp = staged.path();
    // Full fine-tuning has no adapter: the trainable tensors below are the whole state.
    for adapter in adapters
        .iter()
        .filter(|a| model.adapter_config(a).is_some())
    {
        model.save_adapter(tmp, adapter)?;
    }
    staged.write(ADAPTER_STATE, &encode_safetensors(&params)?)?;
    moments.insert("__step".into(), TensorData::new(vec![step as f32], [1]));
    staged.write(OPTIMIZER_STATE, &encode_safetensors(&moments)?)?;
    let json = serde_json::to_vec_pretty(state).expect("state serializes");
    staged.write(TRAINER_STATE, &json)?;
    staged.commit(Previous::Replace)?;
    prune(root, keep_last, &dest)?;
    Ok(dest)
}

fn trainable_values<M: Adaptable + Module>(model: &PeftModel<M>) -> Vec<TensorData> {
    struct Values<'a> {
        ids: &'a std::collections::HashSet<burn::module::ParamId>,
        out: Vec<TensorData>,
    }
    impl burn::module::ModuleVisitor for Values<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.ids.contains(&param.id) {
                self.out.push(param.val().to_data());
            }
        }
    }
    let mut v = Values {
        ids: model.trainable_param_ids(),
        out: Vec::new(),
    };
    model.model().visit(&mut v);
    v.out
}

/// The step of a checkpoint folder name (`step-00000012`).
fn step_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

/// Checkpoint folders under `root`, oldest (lowest step) first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| step_of(p).is_some() && p.join(TRAINER_STATE).is_file())
        .collect();
    // By step, not by name: names stop sorting by step past 8 digits.
    found.sort_by_key(|p| step_of(p));
    found
}

/// The newest complete checkpoint under `root`.
pub fn latest(root: &Path) -> Option<PathBuf> {
    list(root).pop()
}

fn prune(root: &Path, keep_last: usize, just_saved: &Path) -> Result<()> {
    // The checkpoint just written is never pruned, whatever else the folder holds.
    let all: Vec<PathBuf> = list(root).into_iter().filter(|p| p != just_saved).collect();
    let excess = (all.len() + 1).saturating_sub(keep_last.max(1));
    for old in &all[..excess.min(all.len())] {
        // Whole or not at all: a run killed while pruning never leaves a half-deleted
        // checkpoint that still looks complete.
        peft_core::atomic::remove_dir(old)?;
    }
    Ok(())
}

/// What [`load`] returns.
pub struct Loaded {
    /// The trainer state.
    pub state: TrainerState,
    /// Trainable tensors by module path.
    pub params: BTreeMap<String, TensorData>,
    /// Optimizer step and moments.
    pub optimizer: (u64, BTreeMap<String, TensorData>),
}

fn read_all(file: &Path) -> Result<BTreeMap<String, TensorData>> {
    let bytes = fs::read(file).map_err(io(file))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| TrainError::Checkpoint {
        dir: file.to_path_buf(),
        reason: format!("not a valid safetensors file: {e}"),
    })?;
    let shapes: Vec<(String, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect();
    let mut file_tensors = TensorFile::from_bytes(&bytes, file)?;
    let mut out = BTreeMap::new();
    for (k, shape) in shapes {
        out.insert(k.clone(), file_tensors.take(&k, &shape)?);
    }
    Ok(out)
}

/// Read the checkpoint in `dir`.
pub fn load(dir: &Path) -> Result<Loaded> {
    let state_file = dir.join(TRAINER_STATE);
    let text = fs::read_to_string(&state_file).map_err(io(&state_file))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        dir: dir.to_path_buf(),
        reason: format!("{TRAINER_STATE}: {e}"),
    })?;
    let params = read_all(&dir.join(ADAPTER_STATE))?;
    let mut moments = read_all(&dir.join(OPTIMIZER_STATE))?;
    let step = moments
        .remove("__step")
        .and_then(|d| d.try_to_vec::<f32>().ok())
        .and_then(|v| v.first().copied())
        .unwrap_or(0.0) as u64;
    Ok(Loaded {
        state,
        params,
        optimizer: (step, moments),
    })
}

/// Check that `params` (by module path) are exactly the trainable parameters of `model`,
/// with their shapes, as [`restore_params`] needs them; nothing is changed.
pub fn check_params<M: Adaptable + Module>(
    model: &PeftModel<M>,
    params: &BTreeMap<String, TensorData>,
    dir: &Path,
) -> Result<()> {
    let shapes = trainable_shapes(model.model(), model.trainable_param_ids());
    let bad = |reason: String| TrainError::Checkpoint {
        dir: dir.to_path_buf(),
        reason,
    };
    for (path, shape) in &shapes {
        let Some(saved) = params.get(path) else {
            return Err(bad(format!(
                "no saved value for trainable parameter `{path}`; was the checkpoint made with another adapter config?"
            )));
        };
        if saved.shape().to_vec() != *shape {
            return Err(bad(format!(
                "{ADAPTER_STATE}: `{path}` has shape {:?}, this model's parameter is {shape:?} \
                 (was the checkpoint written with another rank or model?)",
                saved.shape()
            )));
        }
    }
    if let Some(extra) = params.keys().find(|k| !shapes.contains_key(*k)) {
        return Err(bad(format!(
            "{ADAPTER_STATE}: `{extra}` is not a trainable parameter of this model \
             (was the checkpoint written with other target_modules or another model?)"
        )));
    }
    Ok(())
}

/// Overwrite the trainable parameters of `model` with `params` (by module path), keeping ids
/// and gradient settings. The saved tensors must be exactly the trainable parameters, with
/// their shapes; anything else (a checkpoint of another rank, other targets or another model)
/// is [`TrainError::Checkpoint`] naming the tensor, and the model is left unchanged.
pub fn restore_params<M: Adaptable + Module>(
    model: &mut PeftModel<M>,
    params: &BTreeMap<String, TensorData>,
    dir: &Path,
) -> Result<()> {
    check_params(model, params, dir)?;
    let wanted: HashMap<burn::module::ParamId, String> =
        trainable_paths(model.model(), model.trainable_param_ids())
            .into_iter()
            .map(|(id, path, _)| (id, path))
            .collect();
    struct Restore<'a> {
        wanted: &'a HashMap<burn::module::ParamId, String>,
        params: &'a BTreeMap<String, TensorData>,
    }
    impl ModuleMapper for Restore<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(path) = self.wanted.get(&param.id) else {
                return param;
            };
            let (id, tensor, mapper) = param.consume();
            let require_grad = tensor.is_require_grad();
            let mut value = Tensor::<D>::from_data(self.params[path].clone(), &tensor.device());
            if require_grad {
                value = value.require_grad();
            }
            Param::from_mapped_value(id, value, mapper)
        }
    }
    let mut restore = Restore {
        wanted: &wanted,
        params,
    };
    model.update(|m| m.map(&mut restore));
    Ok(())
}
