//! `burn-peft merge`: fold an adapter into its base model and write a full Hugging Face model
//! folder (`config.json`, `model.safetensors`, tokenizer files) that transformers loads alone.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use peft_core::bundle::{self, read_config};
use peft_core::{PeftError, PeftModel, peft_type_of};
use peft_models::gguf::hf_tokenizer_files;
use peft_models::{Task, from_pretrained, read_config as read_model_config, save_pretrained_with};
use peft_train::data::{LABEL_MAP_FILE, LabelMap};
use serde_json::Value;

use crate::tensors::InputError;

/// Arguments of `burn-peft merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model folder (config.json + safetensors), GGUF file or Hugging Face hub id.
    #[arg(long)]
    model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to merge.
    #[arg(long)]
    adapter: PathBuf,
    /// Folder to write the merged model to; a previous model there is replaced atomically.
    #[arg(long)]
    output: PathBuf,
    /// Classes of the classifier (SEQ_CLS adapters); by default from the adapter's
    /// label_map.json, else from its saved classifier / score head.
    #[arg(long)]
    num_labels: Option<usize>,
    /// Backend: `flex` (CPU), `cuda[:N]` or `vulkan[:N]`. The merge runs in f32.
    #[arg(long, default_value = "flex")]
    device: String,
}

fn input_error(file: &Path, message: impl Into<String>) -> InputError {
    InputError {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

/// Rows of the classification head saved in the bundle (`modules_to_save` copy of
/// `classifier` / `score`, stored `[num_labels, hidden]`).
pub(crate) fn saved_head_rows(weights: &Path) -> Result<Option<usize>> {
    let bytes = fs::read(weights).map_err(|source| PeftError::Io {
        file: weights.to_path_buf(),
        source,
    })?;
    let tensors =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| PeftError::CorruptFile {
            file: weights.to_path_buf(),
            reason: format!("not a valid safetensors file: {e}"),
        })?;
    let heads = [
        "base_model.model.classifier.weight",
        "base_model.model.score.weight",
        "base_model.classifier.weight",
        "base_model.score.weight",
    ];
    Ok(heads.iter().find_map(|key| {
        let view = tensors.tensor(key).ok()?;
        (view.shape().len() == 2).then(|| view.shape()[0])
    }))
}

/// The head to build, from the adapter's `task_type`, and the label names when known.
fn choose_task(args: &MergeArgs, raw: &Value) -> Result<(Task, Option<Vec<String>>)> {
    let config_file = args.adapter.join(bundle::CONFIG_FILE);
    let task_type = raw.get("task_type").and_then(Value::as_str);
    match task_type {
        Some("SEQ_CLS") => {}
        Some("CAUSAL_LM") => return Ok((Task::CausalLm, None)),
        None | Some("FEATURE_EXTRACTION") => return Ok((Task::Auto, None)),
        Some(other) => {
            return Err(input_error(
                &config_file,
                format!(
                    "task_type `{other}` is not supported by merge; supported: SEQ_CLS, \
                     CAUSAL_LM, FEATURE_EXTRACTION or none"
                ),
            )
            .into());
        }
    }
    let label_file = args.adapter.join(LABEL_MAP_FILE);
    let labels = if label_file.is_file() {
        Some(LabelMap::load(&label_file)?.names)
    } else {
        None
    };
    let num_labels = match (args.num_labels, &labels) {
        (Some(n), Some(names)) if n != names.len() => {
            return Err(input_error(
                &label_file,
                format!(
                    "--num-labels {n} disagrees with the {} labels of this file",
                    names.len()
                ),
            )
            .into());
        }
        (Some(n), _) => n,
        (None, Some(names)) => names.len(),
        (None, None) => match saved_head_rows(&args.adapter.join(bundle::WEIGHTS_FILE))? {
            Some(n) => n,
            None => {
                let (_, base) = read_model_config(&args.model)
                    .with_context(|| format!("reading the config of `{}`", args.model))?;
                match base.num_labels.filter(|_| base.is_sequence_classifier()) {
                    Some(n) => n,
                    None => {
                        return Err(input_error(
                            &config_file,
                            "task_type SEQ_CLS, but the number of labels is unknown: the \
                             adapter has no label_map.json and no saved classifier / score \
                             head, and the base model is not a classifier; pass --num-labels",
                        )
                        .into());
                    }
                }
            }
        },
    };
    if num_labels == 0 {
        return Err(input_error(&config_file, "--num-labels must be at least 1").into());
    }
    Ok((Task::SequenceClassification { num_labels }, labels))
}

/// Run the subcommand.
pub fn run(args: MergeArgs) -> Result<()> {
    let start = Instant::now();
    // Everything about the adapter is checked before the (possibly large) base model loads.
    let loaded = read_config(&args.adapter)?;
    let method = peft_type_of(loaded.method.as_ref());
    if !loaded.method.mergeable() {
        return Err(PeftError::NotSupportedByMethod {
            adapter: args.adapter.display().to_string(),
            method: method.into(),
            reason: "this method has no weight delta to merge (prefix tuning adds virtual \
                     tokens at run time); use the adapter with `--adapter` instead"
                .into(),
        }
        .into());
    }
    let config_file = args.adapter.join(bundle::CONFIG_FILE);
    let raw: Value = serde_json::from_str(&fs::read_to_string(&config_file).map_err(|source| {
        PeftError::Io {
            file: config_file.clone(),
            source,
        }
    })?)
    .map_err(|e| PeftError::CorruptFile {
        file: config_file.clone(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let (task, labels) = choose_task(&args, &raw)?;
    let device = crate::device::parse(&args.device)?;

    let pretrained = from_pretrained(&args.model, task, &device)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let mut model = PeftModel::new(pretrained.model);
    let report = model
        .load_adapter(&args.adapter, "default")
        .with_context(|| format!("loading adapter {}", args.adapter.display()))?;
    for key in &report.unknown_config_keys {
        eprintln!(
            "warning: {}: unknown key `{key}` ignored",
            config_file.display()
        );
    }
    let merged = model
        .merge_and_unload()
        .with_context(|| format!("merging {}", args.adapter.display()))?;
    // A GGUF base carries its tokenizer in its metadata: written out as Hugging Face files
    // (nothing is copied from the folder the .gguf sits in).
    let gguf_files = match (&pretrained.gguf, &pretrained.tokenizer) {
        (Some(file), Some(_)) => Some(hf_tokenizer_files(file)?),
        (Some(_), None) => Some(Vec::new()),
        (None, _) => None,
    };
    let saved = save_pretrained_with(
        &merged,
        &pretrained.config,
        &pretrained.dir,
        &args.output,
        labels.as_deref(),
        gguf_files.as_deref(),
    )
    .with_context(|| format!("writing the merged model to {}", args.output.display()))?;

    println!(
        "merged {method} adapter {} into `{}` as {} ({:.1} s)",
        args.adapter.display(),
        args.model,
        saved.architecture,
        start.elapsed().as_secs_f64()
    );
    println!("wrote {}:", saved.dir.display());
    for file in &saved.files {
        if file == "model.safetensors" {
            println!(
                "  {file} ({} tensors, float32, {:.1} MiB)",
                saved.num_tensors,
                saved.weights_bytes as f64 / (1024.0 * 1024.0)
            );
        } else {
            println!("  {file}");
        }
    }
    Ok(())
}
