//! Helpers for the tiny transformers models of `tests/fixtures/models` (gen/models_tiny.py) and
//! the method fixtures generated on top of them (dora/, ia3/).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Gradients, Int, Tensor, TensorData};
use burn_peft::core::{Adaptable, AdapterState, PeftModel, Site, SitePath};
use burn_peft::models::{HfModel, ModelInputs, ModelOutputs, Task, from_pretrained};

/// `tests/fixtures/<rest>`.
pub fn fixture(rest: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rest)
}

/// `tests/fixtures/models/<name>`.
pub fn model_dir(name: &str) -> PathBuf {
    fixture("models").join(name)
}

/// All tensors of a safetensors file as `f32` (or `i64` converted) values with their shapes.
pub fn read_all(file: &Path) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, (values, view.shape().to_vec()))
        })
        .collect()
}

/// The `f32` tensor `key` of `file`.
pub fn floats(file: &Path, key: &str) -> Vec<f32> {
    read_all(file)
        .remove(key)
        .unwrap_or_else(|| panic!("{key} in {}", file.display()))
        .0
}

fn ints(file: &Path, key: &str, device: &Device) -> Option<Tensor<2, Int>> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).ok()?;
    let values: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some(Tensor::from_data(
        TensorData::new(values, view.shape().to_vec()),
        device,
    ))
}

/// The padded batch of `models/<name>/inputs.safetensors` and its attention mask (`[3, 7]`).
pub fn inputs(name: &str, device: &Device) -> (ModelInputs, Vec<f32>) {
    let file = model_dir(name).join("inputs.safetensors");
    let mask = floats(&file, "attention_mask");
    (
        ModelInputs {
            input_ids: ints(&file, "input_ids", device).unwrap(),
            attention_mask: ints(&file, "attention_mask", device),
            token_type_ids: ints(&file, "token_type_ids", device),
            pixel_values: None,
        },
        mask,
    )
}

/// The base model `models/<name>` on `device`, wrapped.
pub fn load(name: &str, device: &Device) -> PeftModel<HfModel> {
    let pretrained = from_pretrained(model_dir(name).to_str().unwrap(), Task::Auto, device)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    PeftModel::new(pretrained.model)
}

/// The logits of a forward (LM `[b, s, vocab]` or classifier `[b, labels]`), as values.
pub fn logits(outputs: &ModelOutputs) -> Vec<f32> {
    if let Some(l) = &outputs.logits {
        return l.clone().into_data().try_to_vec::<f32>().unwrap();
    }
    let l = outputs.class_logits.clone().expect("a model with logits");
    l.into_data().try_to_vec::<f32>().unwrap()
}

/// Largest difference, relative to the reference where it exceeds 1, over the valid positions
/// of per-token outputs (`mask` is `[b, s]`, the output `[b, s, k]`), or everywhere (`None`).
pub fn max_diff_valid(ours: &[f32], theirs: &[f32], mask: Option<&[f32]>) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let valid = |i: usize| mask.is_none_or(|m| m[i / (ours.len() / m.len())] == 1.0);
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(i, _)| valid(*i))
        .map(|(_, (a, b))| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// Largest difference relative to the reference where it exceeds 1.
pub fn max_rel_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// The gradients of adapter `name`'s tensors in `grads`, named and laid out as the adapter's
/// tensors in a bundle (the kernel's own `export` applied to the gradients).
pub fn adapter_grads(
    model: &PeftModel<HfModel>,
    name: &str,
    grads: &Gradients,
) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    model
        .model()
        .visit_sites(&mut SitePath::root(), &mut |path, site| {
            let adapters: &[AdapterState] = match site {
                Site::Linear(l) => &l.adapters,
                Site::Embedding(e) => &e.adapters,
                Site::KvPrefix(p) => &p.adapters,
                _ => return,
            };
            for adapter in adapters.iter().filter(|a| a.name == name) {
                let mut as_grads = adapter.clone();
                for p in as_grads.matrices.iter_mut() {
                    let g = p
                        .val()
                        .grad(grads)
                        .expect("every adapter matrix has a gradient");
                    *p = Param::from_tensor(g);
                }
                for p in as_grads.vectors.iter_mut() {
                    let g = p
                        .val()
                        .grad(grads)
                        .expect("every adapter vector has a gradient");
                    *p = Param::from_tensor(g);
                }
                for (suffix, data) in adapter.kernel.export(&as_grads) {
                    out.insert(
                        format!("base_model.model.{path}.{suffix}"),
                        data.try_to_vec::<f32>().unwrap(),
                    );
                }
            }
        });
    out
}
