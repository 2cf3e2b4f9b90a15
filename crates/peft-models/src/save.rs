//! Writing a model back as a Hugging Face folder (`config.json` + `model.safetensors` +
//! tokenizer files) that `transformers`' `AutoModel*.from_pretrained` loads unchanged: the
//! inverse of [`from_pretrained`](crate::from_pretrained).
//!
//! Used after [`PeftModel::merge_and_unload`](peft_core::PeftModel::merge_and_unload) to ship a
//! merged model that needs neither PEFT nor burn-peft.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use burn_store::burn_pack::Tensor as PackTensor;
use burn_store::{
    BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleContext, ModuleSnapshot,
};
use serde_json::{Map, Value};

use peft_core::atomic::{Previous, StagedDir};

use crate::auto::{HfModel, Task};
use crate::config::HfConfig;
use crate::error::{ModelError, Result};

/// File name of the weights written by [`save_pretrained`].
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// File name of the config written by [`save_pretrained`].
pub const CONFIG_FILE: &str = "config.json";

/// Files copied unchanged from the source folder when present: tokenizer and generation
/// settings, so the saved folder is complete for `AutoTokenizer` and `generate()`.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];

/// What [`save_pretrained`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedModel {
    /// The model folder.
    pub dir: PathBuf,
    /// The transformers class named in `config.json`'s `architectures`
    /// (e.g. `BertForSequenceClassification`).
    pub architecture: String,
    /// The files of the folder, in the order written: `model.safetensors`, `config.json`, then
    /// the copied tokenizer / generation files.
    pub files: Vec<String>,
    /// Number of tensors in `model.safetensors`.
    pub num_tensors: usize,
    /// Size of `model.safetensors` in bytes.
    pub weights_bytes: u64,
}

/// The transformers class that `model` is saved as (`LlamaForCausalLM`,
/// `Qwen2ForSequenceClassification`, `GPT2LMHeadModel`, `BertModel`, ...).
pub fn architecture_name(model: &HfModel) -> String {
    model.arch().hf_class()
}

/// The number of outputs of a sequence-classification head, `None` for other models.
pub fn num_labels(model: &HfModel) -> Option<usize> {
    match model.task() {
        Task::SequenceClassification { num_labels } => Some(num_labels),
        _ => None,
    }
}

/// Burn -> PyTorch conversion for the export: `nn.Linear` weights transposed back to
/// `[out, in]`, norm `gamma/beta` renamed to `weight/bias`, and the tensors the family stores
/// `[in, out]` (GPT-2's `Conv1D`) left as they are.
#[derive(Debug, Clone)]
struct HfExportAdapter {
    in_out: std::collections::BTreeSet<String>,
}

impl ModuleAdapter for HfExportAdapter {
    fn adapt(&self, tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
        if self.in_out.contains(&tensor.name) {
            return tensor;
        }
        BurnToPyTorchAdapter.adapt(tensor, ctx)
    }

    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        BurnToPyTorchAdapter.get_alternative_param_name(param_name, container_type)
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// The tensors of `model` under their Hugging Face names and in PyTorch layout (float32,
/// data read lazily), sorted by name: exactly what `transformers` expects in
/// `model.safetensors` for the class [`architecture_name`] gives. Output heads tied to the
/// input embedding are not stored (transformers re-ties them), as `save_pretrained` does.
///
/// The family names the checkpoint keys ([`ArchModel::to_checkpoint`]); `source_dir` is the
/// folder the model came from, for families whose key style follows it (a bare BERT encoder
/// with or without `bert.`). Quantized bases are written dequantized. Fails if the model still
/// carries adapters: merge and unload them first.
pub fn hf_tensors(model: &HfModel, source_dir: &Path) -> Result<Vec<(String, PackTensor)>> {
    // A quantized base (QLoRA, GGUF) is written in f32, as PEFT's merge writes float weights;
    // the clone shares every tensor until a site is made dense.
    let mut dense = model.clone();
    let model = if peft_core::nn::dequantize_sites(&mut dense) > 0 {
        &dense
    } else {
        model
    };
    let arch = model.arch();
    // The module paths whose tensors the family stores `[in, out]`, from a first pass.
    let in_out = model
        .collect(None, None, true)
        .into_iter()
        .map(|t| t.name)
        .filter(|name| arch.stored_as_in_out(name))
        .collect();
    let adapter = HfExportAdapter { in_out }.chain(FloatCastAdapter::to(DType::F32));
    let collected = model.collect(None, Some(Box::new(adapter)), true);
    let weights = source_dir.join(WEIGHTS_FILE);
    let mut out: Vec<(String, PackTensor)> = Vec::with_capacity(collected.len() + 1);
    for tensor in collected {
        let path = tensor.name.clone();
        if path
            .split('.')
            .any(|s| matches!(s, "adapters" | "copies" | "prompt_encoder"))
        {
            return Err(ModelError::Save {
                file: weights,
                reason: format!(
                    "the model still carries adapter tensors (`{path}`); merge and unload the \
                     adapters before saving a full model"
                ),
            });
        }
        if tensor.dtype != DType::F32 {
            return Err(ModelError::Save {
                file: weights,
                reason: format!("tensor `{path}` has dtype {:?}, expected F32", tensor.dtype),
            });
        }
        out.push((path, tensor));
    }
    let mut out = arch.to_checkpoint(out, source_dir);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let mut seen = BTreeSet::new();
    if let Some((dup, _)) = out.iter().find(|(n, _)| !seen.insert(n.clone())) {
        return Err(ModelError::Save {
            file: weights,
            reason: format!("two tensors map to the name `{dup}`"),
        });
    }
    Ok(out)
}

/// A lazily read tensor as a safetensors view. Reading a tensor back from its device cannot
/// report an error through [`safetensors::View`]; it panics and [`write_weights`] turns the
/// panic into an error.
struct LazyView {
    tensor: PackTensor,
    shape: Vec<usize>,
}

impl safetensors::View for &LazyView {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let bytes = self
            .tensor
            .to_bytes()
            .unwrap_or_else(|e| panic!("cannot read tensor `{}` back: {e}", self.tensor.name));
        Cow::Owned(bytes.to_vec())
    }

    fn data_len(&self) -> usize {
        self.tensor.byte_len()
    }
}

/// Stream `tensors` to `file` (safetensors with `{"format": "pt"}` metadata, which
/// transformers requires), one tensor in memory at a time.
fn write_weights(file: &Path, tensors: Vec<(String, PackTensor)>) -> Result<()> {
    let views: Vec<(String, LazyView)> = tensors
        .into_iter()
        .map(|(name, tensor)| {
            let shape = tensor.shape.to_vec();
            (name, LazyView { tensor, shape })
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        safetensors::serialize_to_file(
            views.iter().map(|(n, v)| (n.as_str(), v)),
            Some(metadata),
            file,
        )
    }));
    let reason = match result {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a tensor could not be read back".into()),
    };
    Err(ModelError::Save {
        file: file.to_path_buf(),
        reason,
    })
}

fn io_error(file: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        file: file.to_path_buf(),
        source,
    }
}

/// The source `config.json` adjusted for the saved model: `architectures` names the saved
/// class, `dtype` / `torch_dtype` say float32, and a classifier's `num_labels`, `id2label` and
/// `label2id` match its head (names from `labels`, else the source's when their count matches,
/// else transformers' `LABEL_<i>`).
pub fn merged_config(
    model: &HfModel,
    config: &HfConfig,
    labels: Option<&[String]>,
) -> Result<Value> {
    let mut raw = match &config.raw {
        Value::Object(map) => map.clone(),
        _ => {
            return Err(ModelError::InvalidConfig {
                file: config.file.clone(),
                reason: "not a JSON object".into(),
            });
        }
    };
    raw.insert(
        "architectures".into(),
        Value::Array(vec![Value::String(architecture_name(model))]),
    );
    for key in ["dtype", "torch_dtype"] {
        if raw.contains_key(key) {
            raw.insert(key.into(), Value::String("float32".into()));
        }
    }
    let Some(n) = num_labels(model) else {
        if labels.is_some() {
            return Err(ModelError::InvalidInput(format!(
                "label names were given but a {} has no classification head",
                architecture_name(model)
            )));
        }
        return Ok(Value::Object(raw));
    };
    let names: Vec<String> = match labels {
        Some(labels) if labels.len() != n => {
            return Err(ModelError::InvalidInput(format!(
                "{} label names were given for a classification head with {n} outputs",
                labels.len()
            )));
        }
        Some(labels) => labels.to_vec(),
        None => {
            let existing: Option<Vec<String>> = raw
                .get("id2label")
                .and_then(Value::as_object)
                .filter(|m| m.len() == n)
                .and_then(|m| {
                    (0..n)
                        .map(|i| {
                            m.get(&i.to_string())
                                .and_then(Value::as_str)
                                .map(String::from)
                        })
                        .collect()
                });
            existing.unwrap_or_else(|| (0..n).map(|i| format!("LABEL_{i}")).collect())
        }
    };
    let id2label: Map<String, Value> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (i.to_string(), Value::String(name.clone())))
        .collect();
    let label2id: Map<String, Value> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), Value::from(i)))
        .collect();
    if label2id.len() != n {
        return Err(ModelError::InvalidInput(
            "label names must be distinct (they become config.json's label2id keys)".into(),
        ));
    }
    raw.insert("id2label".into(), Value::Object(id2label));
    raw.insert("label2id".into(), Value::Object(label2id));
    raw.insert("num_labels".into(), Value::from(n));
    Ok(Value::Object(raw))
}

/// Check that `out_dir` may be (re)placed: absent, an empty folder, or a folder holding a
/// previous model (`config.json`), and not the source folder itself.
fn check_target(out_dir: &Path, source_dir: &Path) -> Result<()> {
    let refuse = |reason: &str| {
        Err(ModelError::Save {
            file: out_dir.to_path_buf(),
            reason: reason.into(),
        })
    };
    let Ok(meta) = fs::symlink_metadata(out_dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return refuse("exists and is not a folder; choose another output path");
    }
    if let (Ok(a), Ok(b)) = (out_dir.canonicalize(), source_dir.canonicalize())
        && (a == b || b.starts_with(&a))
    {
        return refuse("is (or contains) the source model folder; choose another output path");
    }
    let empty = fs::read_dir(out_dir)
        .map_err(io_error(out_dir))?
        .next()
        .is_none();
    if !empty && !out_dir.join(CONFIG_FILE).is_file() {
        return refuse(
            "exists and does not hold a model (no config.json); refusing to replace it, \
             choose a new or empty folder",
        );
    }
    Ok(())
}

/// Write `model` as a Hugging Face model folder in `out_dir`: `model.safetensors` (Hugging Face
/// names and PyTorch layout, float32, see [`hf_tensors`]), `config.json` (the source config with
/// `architectures` set to the saved class and, for classifiers, `num_labels` / `id2label` /
/// `label2id` from `labels` when given, see [`merged_config`]) and the tokenizer and generation
/// files of `source_dir` ([`COPIED_FILES`]).
///
/// `config` and `source_dir` are the [`Pretrained`](crate::Pretrained) `config` and `dir` the
/// model was loaded with. The model must carry no adapter (call
/// [`PeftModel::merge_and_unload`](peft_core::PeftModel::merge_and_unload) first).
///
/// Atomic: everything is written and fsynced in a hidden folder beside `out_dir`, which is then
/// renamed into place. An existing `out_dir` holding a previous model (or empty) is replaced
/// only once the new one is complete; on any failure it is left as it was. A non-empty
/// `out_dir` without `config.json`, or the source folder itself, is refused.
pub fn save_pretrained(
    model: &HfModel,
    config: &HfConfig,
    source_dir: &Path,
    out_dir: &Path,
    labels: Option<&[String]>,
) -> Result<SavedModel> {
    save_pretrained_with(model, config, source_dir, out_dir, labels, None)
}

/// [`save_pretrained`] with the tokenizer and generation files given instead of copied from
/// `source_dir` (`extra_files`: name and bytes, for a model whose tokenizer came from elsewhere,
/// such as a GGUF file's metadata, see [`crate::gguf::hf_tokenizer_files`]).
pub fn save_pretrained_with(
    model: &HfModel,
    config: &HfConfig,
    source_dir: &Path,
    out_dir: &Path,
    labels: Option<&[String]>,
    extra_files: Option<&[(String, Vec<u8>)]>,
) -> Result<SavedModel> {
    if out_dir.file_name().is_none() {
        return Err(ModelError::Save {
            file: out_dir.to_path_buf(),
            reason: "not a folder path (it has no final name)".into(),
        });
    }
    check_target(out_dir, source_dir)?;
    // Everything that can fail on bad input happens before anything touches the disk.
    let config_json = merged_config(model, config, labels)?;
    let tensors = hf_tensors(model, source_dir)?;
    let num_tensors = tensors.len();

    let staging = StagedDir::create(out_dir)?;
    let mut files = Vec::new();

    let weights = staging.path().join(WEIGHTS_FILE);
    write_weights(&weights, tensors)?;
    let weights_bytes = fs::metadata(&weights).map_err(io_error(&weights))?.len();
    files.push(WEIGHTS_FILE.to_string());

    let mut text = serde_json::to_string_pretty(&config_json).expect("JSON values render");
    text.push('\n');
    staging.write(CONFIG_FILE, text.as_bytes())?;
    files.push(CONFIG_FILE.to_string());

    if let Some(extra) = extra_files {
        for (name, bytes) in extra {
            staging.write(name, bytes)?;
            files.push(name.clone());
        }
    }
    for file in COPIED_FILES.iter().filter(|_| extra_files.is_none()) {
        let from = source_dir.join(file);
        if !from.is_file() {
            continue;
        }
        let to = staging.path().join(file);
        fs::copy(&from, &to).map_err(io_error(&from))?;
        files.push(file.to_string());
    }
    // Everything is fsynced and swapped in by the one atomic-save helper of the project.
    staging.commit(Previous::Replace)?;
    Ok(SavedModel {
        dir: out_dir.to_path_buf(),
        architecture: architecture_name(model),
        files,
        num_tensors,
        weights_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auto::{Task, from_pretrained};
    use burn::tensor::Device;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name)
    }

    fn read(file: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        let bytes = fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec(), v.data().to_vec()))
            .collect();
        out.sort();
        out
    }

    /// Loading then saving a base model gives back its checkpoint byte for byte: the same
    /// names, shapes and values, for every family.
    #[test]
    fn round_trip_is_exact() {
        let device = Device::flex();
        for name in [
            "bert",
            "bert_cls",
            "gpt2",
            "llama_gqa",
            "llama_tied",
            "llama_cls",
            "qwen2",
        ] {
            let dir = fixture(name);
            let loaded = from_pretrained(dir.to_str().unwrap(), Task::Auto, &device).unwrap();
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("merged");
            let saved =
                save_pretrained(&loaded.model, &loaded.config, &loaded.dir, &out, None).unwrap();
            assert_eq!(
                read(&out.join(WEIGHTS_FILE)),
                read(&dir.join(WEIGHTS_FILE)),
                "{name}"
            );
            let config: Value =
                serde_json::from_str(&fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
            assert_eq!(
                config["architectures"], loaded.config.raw["architectures"],
                "{name}"
            );
            assert_eq!(saved.num_tensors, read(&dir.join(WEIGHTS_FILE)).len());
            let generation = dir.join("generation_config.json").is_file();
            assert_eq!(
                saved.files.contains(&"generation_config.json".to_string()),
                generation
            );
        }
    }

    #[test]
    fn replaces_a_previous_model_and_refuses_other_folders() {
        let device = Device::flex();
        let dir = fixture("bert_cls");
        let loaded = from_pretrained(dir.to_str().unwrap(), Task::Auto, &device).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        let labels: Vec<String> = ["neg", "neutral", "pos"].map(String::from).to_vec();
        save_pretrained(&loaded.model, &loaded.config, &dir, &out, None).unwrap();
        fs::write(out.join("stale.txt"), "old").unwrap();
        save_pretrained(&loaded.model, &loaded.config, &dir, &out, Some(&labels)).unwrap();
        assert!(
            !out.join("stale.txt").exists(),
            "the old folder is replaced"
        );
        let config: Value =
            serde_json::from_str(&fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(config["id2label"]["2"], "pos");
        assert_eq!(config["label2id"]["neg"], 0);
        assert_eq!(config["num_labels"], 3);
        // Wrong label count: an error, and the previous model stays.
        let bad = ["a".to_string()];
        let err = save_pretrained(&loaded.model, &loaded.config, &dir, &out, Some(&bad));
        assert!(matches!(err, Err(ModelError::InvalidInput(_))), "{err:?}");
        assert!(out.join(WEIGHTS_FILE).is_file());
        // A folder that is not a model is not replaced.
        let other = tmp.path().join("docs");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("notes.txt"), "keep").unwrap();
        let err = save_pretrained(&loaded.model, &loaded.config, &dir, &other, None).unwrap_err();
        assert!(err.to_string().contains("does not hold a model"), "{err}");
        assert!(other.join("notes.txt").is_file());
        // The source folder itself is refused.
        let err = save_pretrained(&loaded.model, &loaded.config, &dir, &dir, None).unwrap_err();
        assert!(err.to_string().contains("source model folder"), "{err}");
        // No staging folders are left behind.
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
