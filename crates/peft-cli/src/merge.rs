//! `burn-peft merge`: fold an adapter into its base model and write a full Hugging Face model
//! folder (`config.json`, `model.safetensors`, tokenizer files) that transformers loads alone;
//! or, for a diffusers pipeline folder (`model_index.json`) or a single-file Stable Diffusion
//! checkpoint (`*.safetensors` in the original LDM / SGM layout), fuse kohya / diffusers Stable
//! Diffusion LoRA files into its UNet and text encoders ([`peft_lora::kohya::fuse`]); a single
//! file is written back as one file with the same header.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use peft_core::bundle::{self, read_config};
use peft_core::{PeftError, PeftModel, peft_type_of};
use peft_lora::kohya;
use peft_models::gguf::hf_tokenizer_files;
use peft_models::{Task, from_pretrained, read_config as read_model_config, save_pretrained_with};
use peft_train::data::{LABEL_MAP_FILE, LabelMap};
use serde_json::Value;

use crate::UsageError;
use crate::tensors::InputError;

/// Arguments of `burn-peft merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model folder (config.json + safetensors), GGUF file or Hugging Face hub id; or a
    /// diffusers pipeline folder (model_index.json) or single-file SD 1.x / 2.x / SDXL
    /// checkpoint (.safetensors, original LDM layout), into which Stable Diffusion LoRA files
    /// are fused as diffusers' set_adapters + fuse_lora does.
    #[arg(long)]
    model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to merge. For a
    /// diffusers or single-file SD --model: a kohya / diffusers LoRA file,
    /// `FILE.safetensors[:WEIGHT]` (weight 1 by default); repeat the flag to fuse several.
    #[arg(long, required = true)]
    adapter: Vec<PathBuf>,
    /// Folder to write the merged model to; a previous model there is replaced atomically.
    /// For a single-file SD checkpoint: the fused `.safetensors` file (replaced atomically).
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
fn choose_task(
    args: &MergeArgs,
    adapter: &Path,
    raw: &Value,
) -> Result<(Task, Option<Vec<String>>)> {
    let config_file = adapter.join(bundle::CONFIG_FILE);
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
    let label_file = adapter.join(LABEL_MAP_FILE);
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
        (None, None) => match saved_head_rows(&adapter.join(bundle::WEIGHTS_FILE))? {
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
    let model = Path::new(&args.model);
    if model.join("model_index.json").is_file() || single_file_checkpoint(model) {
        return run_diffusers(&args);
    }
    let start = Instant::now();
    let adapter = match args.adapter.as_slice() {
        [one] => one.clone(),
        several => {
            return Err(UsageError(format!(
                "--adapter is given {} times: a PEFT adapter is merged alone (several LoRA files \
                 are fused only into a diffusers folder with model_index.json); combine PEFT \
                 adapters first with `burn-peft combine`",
                several.len()
            ))
            .into());
        }
    };
    // Everything about the adapter is checked before the (possibly large) base model loads.
    let loaded = read_config(&adapter)?;
    let method = peft_type_of(loaded.method.as_ref());
    if !loaded.method.mergeable() {
        return Err(PeftError::NotSupportedByMethod {
            adapter: adapter.display().to_string(),
            method: method.into(),
            reason: "this method has no weight delta to merge (prefix tuning adds virtual \
                     tokens at run time); use the adapter with `--adapter` instead"
                .into(),
        }
        .into());
    }
    let config_file = adapter.join(bundle::CONFIG_FILE);
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
    let (task, labels) = choose_task(&args, &adapter, &raw)?;
    let device = crate::device::parse(&args.device)?;

    let pretrained = from_pretrained(&args.model, task, &device)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let mut model = PeftModel::new(pretrained.model);
    let report = model
        .load_adapter(&adapter, "default")
        .with_context(|| format!("loading adapter {}", adapter.display()))?;
    for key in &report.unknown_config_keys {
        eprintln!(
            "warning: {}: unknown key `{key}` ignored",
            config_file.display()
        );
    }
    let merged = model
        .merge_and_unload()
        .with_context(|| format!("merging {}", adapter.display()))?;
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
        adapter.display(),
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

/// `FILE[:WEIGHT]`: the suffix after the last `:` is a weight when it parses as a number and
/// the whole argument is not an existing file (a path may hold `:`); else the weight is 1.
fn weighted_lora(arg: &Path) -> Result<(PathBuf, f64)> {
    let Some(text) = arg.to_str() else {
        return Ok((arg.to_path_buf(), 1.0));
    };
    if arg.exists() {
        return Ok((arg.to_path_buf(), 1.0));
    }
    match text.rsplit_once(':') {
        Some((file, weight)) if !file.is_empty() => match weight.trim().parse::<f64>() {
            Ok(w) if w.is_finite() => Ok((PathBuf::from(file), w)),
            Ok(w) => Err(UsageError(format!(
                "--adapter {text}: weight {w} is not a finite number"
            ))
            .into()),
            Err(_) => Ok((arg.to_path_buf(), 1.0)),
        },
        _ => Ok((arg.to_path_buf(), 1.0)),
    }
}

/// Whether `--model` is a `.safetensors` file: a single-file SD checkpoint (no PEFT base model
/// is one file of that kind).
fn single_file_checkpoint(model: &Path) -> bool {
    model.is_file()
        && model
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// Fuse kohya / diffusers Stable Diffusion LoRA files into a diffusers pipeline folder or a
/// single-file checkpoint.
fn run_diffusers(args: &MergeArgs) -> Result<()> {
    let start = Instant::now();
    if args.num_labels.is_some() {
        return Err(UsageError(format!(
            "--num-labels is for PEFT classifier adapters; {} is a Stable Diffusion model",
            args.model
        ))
        .into());
    }
    let loras = args
        .adapter
        .iter()
        .map(|a| weighted_lora(a.as_path()))
        .collect::<Result<Vec<_>>>()?;
    let model = Path::new(&args.model);
    let report = kohya::fuse(model, &loras, &args.output).with_context(|| {
        format!(
            "fusing {} LoRA file(s) into {}",
            loras.len(),
            model.display()
        )
    })?;
    for lora in &report.loras {
        if !lora.skipped.is_empty() {
            let shown: Vec<&str> = lora.skipped.iter().take(5).map(String::as_str).collect();
            eprintln!(
                "warning: {}: {} module(s) match no weight of the model and were skipped: {}{}",
                lora.file.display(),
                lora.skipped.len(),
                shown.join(", "),
                if lora.skipped.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            );
        }
    }
    let single = single_file_checkpoint(model);
    println!(
        "fused {} LoRA file(s) into {} `{}` ({:.1} s)",
        report.loras.len(),
        if single {
            "single-file checkpoint"
        } else {
            "diffusers model"
        },
        args.model,
        start.elapsed().as_secs_f64()
    );
    for lora in &report.loras {
        println!(
            "  {} (weight {}): {} module(s)",
            lora.file.display(),
            lora.weight,
            lora.fused
        );
    }
    println!("wrote {}:", report.output.display());
    for c in &report.components {
        println!(
            "  {} ({} weight(s) fused, {})",
            if single {
                c.component.clone()
            } else {
                c.file.display().to_string()
            },
            c.tensors,
            c.dtypes.join(", ")
        );
    }
    if single {
        println!("  every other tensor, the header and its metadata unchanged");
        return Ok(());
    }
    println!("  {} other file(s) copied unchanged", report.copied_files);
    for file in &report.dropped_files {
        println!(
            "  left out {} (other weights of a fused component, still unfused)",
            file.display()
        );
    }
    Ok(())
}
