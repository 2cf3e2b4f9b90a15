//! `burn-peft combine`: build one LoRA adapter from several (PEFT's `add_weighted_adapter`) and
//! write it as a PEFT bundle, or combine kohya Stable Diffusion LoRA files into one file by
//! concatenating their ranks ([`peft_lora::kohya::combine`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use peft_core::bundle::{self, read_config};
use peft_core::{CombinationType, CombineOptions, MajoritySignMethod, PeftModel};
use peft_models::{Task, from_pretrained, read_config as read_model_config};
use serde_json::Value;

use crate::UsageError;
use crate::merge::saved_head_rows;

// Link the method crates so their `peft_type`s are registered.
use peft_lora as _;
use peft_prefix as _;

/// The name the combined adapter gets inside the model (saved at the top of `--output`).
const COMBINED: &str = "default";

/// Arguments of `burn-peft combine`.
#[derive(Args, Debug)]
pub struct CombineArgs {
    /// Base model folder (config.json + safetensors) or Hugging Face hub id (required for PEFT
    /// bundles; not used for .safetensors LoRA files).
    #[arg(long)]
    model: Option<String>,
    /// An input adapter as NAME=DIR:WEIGHT (e.g. `a=out/adapter:0.7`; weights may be negative);
    /// repeat for each adapter. The first one's config is the template of the result. Or, to
    /// combine kohya Stable Diffusion LoRA files into one, FILE.safetensors[:WEIGHT] (weight 1
    /// if none) for every input.
    #[arg(long = "adapter", value_name = "NAME=DIR:WEIGHT", required = true)]
    adapters: Vec<String>,
    /// Combination type: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties,
    /// dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd [default: svd for
    /// PEFT bundles; cat, the only one allowed, for .safetensors LoRA files].
    #[arg(long = "type", value_parser = parse_type)]
    combination_type: Option<CombinationType>,
    /// Fraction of values kept by pruning, in [0, 1] (ties*, dare*, magnitude_prune*).
    #[arg(long)]
    density: Option<f64>,
    /// Sign election of the TIES types: total or frequency.
    #[arg(long, default_value = "total", value_parser = parse_sign_method)]
    majority_sign_method: MajoritySignMethod,
    /// Rank of the result of the SVD types (default: the largest input rank).
    #[arg(long)]
    svd_rank: Option<usize>,
    /// Clamp the SVD factors at this quantile of their values, in [0, 1].
    #[arg(long)]
    svd_clamp: Option<f64>,
    /// Seed of the DARE masks (same seed, same adapter).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder to write the combined PEFT bundle to; a previous bundle there is replaced
    /// atomically. For .safetensors LoRA inputs: the combined file (ending in .safetensors).
    #[arg(long)]
    output: PathBuf,
    /// Backend: `flex` (CPU), `cuda[:N]` or `vulkan[:N]`.
    #[arg(long, default_value = "flex")]
    device: String,
}

fn parse_type(s: &str) -> Result<CombinationType, String> {
    s.parse().map_err(|e: peft_core::PeftError| e.to_string())
}

fn parse_sign_method(s: &str) -> Result<MajoritySignMethod, String> {
    s.parse().map_err(|e: peft_core::PeftError| e.to_string())
}

/// One `--adapter NAME=DIR:WEIGHT`.
#[derive(Debug, Clone, PartialEq)]
struct AdapterArg {
    name: String,
    dir: PathBuf,
    weight: f64,
}

fn parse_adapter(spec: &str) -> Result<AdapterArg, UsageError> {
    let usage = |what: &str| {
        UsageError(format!(
            "--adapter `{spec}`: {what}; write NAME=DIR:WEIGHT, e.g. --adapter a=out/adapter:0.7"
        ))
    };
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| usage("no `=` after the adapter name"))?;
    // The weight follows the last ':', so folders may contain ':'.
    let (dir, weight) = rest
        .rsplit_once(':')
        .ok_or_else(|| usage("no `:WEIGHT` after the folder"))?;
    if name.is_empty() || dir.is_empty() {
        return Err(usage("the name and the folder must not be empty"));
    }
    if name == COMBINED {
        return Err(usage(
            "`default` is the name of the combined adapter; call the inputs something else",
        ));
    }
    let weight: f64 = weight
        .trim()
        .parse()
        .map_err(|_| usage(&format!("the weight `{weight}` is not a number")))?;
    if !weight.is_finite() {
        return Err(usage(&format!(
            "the weight `{weight}` is not a finite number"
        )));
    }
    Ok(AdapterArg {
        name: name.to_string(),
        dir: PathBuf::from(dir),
        weight,
    })
}

/// The head the adapters need (a SEQ_CLS adapter carries a classifier copy), as `merge` does.
fn choose_task(model: &str, first: &AdapterArg, raw: &Value) -> Result<Task> {
    match raw.get("task_type").and_then(Value::as_str) {
        Some("CAUSAL_LM") => Ok(Task::CausalLm),
        Some("SEQ_CLS") => {
            let rows = saved_head_rows(&first.dir.join(bundle::WEIGHTS_FILE))?;
            let num_labels = match rows {
                Some(n) => Some(n),
                None => {
                    let (_, base) = read_model_config(model)
                        .with_context(|| format!("reading the config of `{model}`"))?;
                    base.num_labels.filter(|_| base.is_sequence_classifier())
                }
            };
            Ok(
                num_labels.map_or(Task::Auto, |num_labels| Task::SequenceClassification {
                    num_labels,
                }),
            )
        }
        _ => Ok(Task::Auto),
    }
}

fn read_json(file: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(file).map_err(|source| peft_core::PeftError::Io {
        file: file.to_path_buf(),
        source,
    })?;
    Ok(
        serde_json::from_str(&text).map_err(|e| peft_core::PeftError::CorruptFile {
            file: file.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?,
    )
}

/// One `--adapter FILE[:WEIGHT]` naming a `.safetensors` LoRA file, or `None` if the value does
/// not name one: the weight follows the last ':' when it parses as a finite number and the
/// whole value is not an existing file.
fn parse_lora_file(spec: &str) -> Option<(PathBuf, f64)> {
    let is_safetensors = |p: &str| p.to_ascii_lowercase().ends_with(".safetensors");
    if Path::new(spec).is_file() {
        return is_safetensors(spec).then(|| (PathBuf::from(spec), 1.0));
    }
    let (file, weight) = match spec.rsplit_once(':') {
        Some((file, w)) => match w.trim().parse::<f64>() {
            Ok(w) if w.is_finite() => (file, w),
            _ => (spec, 1.0),
        },
        None => (spec, 1.0),
    };
    is_safetensors(file).then(|| (PathBuf::from(file), weight))
}

/// `burn-peft combine` on kohya `.safetensors` LoRA files: concatenate their ranks into one
/// file (exact).
fn run_lora_files(args: &CombineArgs, inputs: Vec<(PathBuf, f64)>) -> Result<()> {
    let start = Instant::now();
    if let Some(t) = args.combination_type
        && t != CombinationType::Cat
    {
        return Err(UsageError(format!(
            "--type {t}: only `cat` (concatenating the ranks) is exact for LoRA files; drop              --type or pass --type cat"
        ))
        .into());
    }
    if args.model.is_some() {
        return Err(UsageError(
            "--model is not used when combining .safetensors LoRA files; drop it".into(),
        )
        .into());
    }
    for (flag, given) in [
        ("--density", args.density.is_some()),
        ("--svd-rank", args.svd_rank.is_some()),
        ("--svd-clamp", args.svd_clamp.is_some()),
    ] {
        if given {
            return Err(UsageError(format!(
                "{flag} does not apply to `cat`, the only type for .safetensors LoRA files"
            ))
            .into());
        }
    }
    if !args
        .output
        .to_string_lossy()
        .to_ascii_lowercase()
        .ends_with(".safetensors")
    {
        return Err(UsageError(format!(
            "--output {}: combining .safetensors LoRA files writes one file; give a path              ending in .safetensors",
            args.output.display()
        ))
        .into());
    }
    let report = peft_lora::kohya::combine(&inputs, &args.output)
        .with_context(|| format!("combining into {}", args.output.display()))?;
    println!(
        "combined {} with `cat` into {} modules, rank up to {}, {} ({:.1} s)",
        report
            .loras
            .iter()
            .map(|l| format!("{}×{}", l.weight, l.file.display()))
            .collect::<Vec<_>>()
            .join(" + "),
        report.modules,
        report.max_rank,
        report.dtype,
        start.elapsed().as_secs_f64()
    );
    println!("wrote {}", report.output.display());
    Ok(())
}

/// Run the subcommand.
pub fn run(args: CombineArgs) -> Result<()> {
    let files: Vec<Option<(PathBuf, f64)>> =
        args.adapters.iter().map(|s| parse_lora_file(s)).collect();
    if files.iter().all(Option::is_some) {
        return run_lora_files(&args, files.into_iter().flatten().collect());
    }
    if files.iter().any(Option::is_some) {
        return Err(UsageError(
            "--adapter: some inputs are .safetensors LoRA files and some PEFT bundles              (NAME=DIR:WEIGHT); combine one kind at a time"
                .into(),
        )
        .into());
    }
    let Some(model_id) = args.model.clone() else {
        return Err(UsageError(
            "--model is required to combine PEFT bundles (NAME=DIR:WEIGHT)".into(),
        )
        .into());
    };
    let combination_type = args.combination_type.unwrap_or(CombinationType::Svd);
    let start = Instant::now();
    let inputs: Vec<AdapterArg> = args
        .adapters
        .iter()
        .map(|s| parse_adapter(s))
        .collect::<Result<_, _>>()?;
    if let Some(dup) = inputs
        .iter()
        .enumerate()
        .find(|(i, a)| inputs[..*i].iter().any(|b| b.name == a.name))
    {
        return Err(UsageError(format!(
            "--adapter: the name `{}` is given twice; give each input its own name",
            dup.1.name
        ))
        .into());
    }
    let options = CombineOptions {
        combination_type,
        density: args.density,
        majority_sign_method: args.majority_sign_method,
        svd_rank: args.svd_rank,
        svd_clamp: args.svd_clamp,
        seed: args.seed,
        ..Default::default()
    };
    options
        .validate()
        .context("checking the combination options")?;
    // Every bundle is checked before the (possibly large) base model loads.
    for input in &inputs {
        if !input.dir.join(bundle::CONFIG_FILE).is_file() {
            return Err(UsageError(format!(
                "--adapter {}: {} is not an adapter folder (no {}); pass the folder a PEFT \
                 bundle was saved to",
                input.name,
                input.dir.display(),
                bundle::CONFIG_FILE
            ))
            .into());
        }
        read_config(&input.dir).with_context(|| {
            format!(
                "--adapter {}: reading the adapter folder {}",
                input.name,
                input.dir.display()
            )
        })?;
    }
    let raw = read_json(&inputs[0].dir.join(bundle::CONFIG_FILE))?;
    let task = choose_task(&model_id, &inputs[0], &raw)?;
    let device = crate::device::parse(&args.device)?;
    let pretrained = from_pretrained(&model_id, task, &device)
        .with_context(|| format!("loading model `{model_id}`"))?;
    let mut model = PeftModel::new(pretrained.model).with_base_model_name(model_id.clone());
    for input in &inputs {
        model
            .load_adapter(&input.dir, &input.name)
            .with_context(|| {
                format!("--adapter {}: loading {}", input.name, input.dir.display())
            })?;
    }
    let weighted: Vec<(&str, f64)> = inputs.iter().map(|a| (a.name.as_str(), a.weight)).collect();
    let report = model
        .add_weighted_adapter(&weighted, COMBINED, &options)
        .with_context(|| format!("combining with --type {}", combination_type))?;
    model
        .save_adapter(&args.output, COMBINED)
        .with_context(|| format!("writing the bundle to {}", args.output.display()))?;

    let config = bundle::method_to_json(
        model
            .adapter_config(COMBINED)
            .expect("the combined adapter exists"),
    );
    println!(
        "combined {} ({}) with `{}` into r={} lora_alpha={} at {} modules ({:.1} s)",
        inputs
            .iter()
            .map(|a| format!("{}×{}", a.weight, a.name))
            .collect::<Vec<_>>()
            .join(" + "),
        model_id,
        combination_type,
        config["r"],
        config["lora_alpha"],
        report.adapted.len(),
        start.elapsed().as_secs_f64()
    );
    println!("target_modules: {}", config["target_modules"]);
    println!("wrote {}", args.output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_file_specs_parse_with_an_optional_weight() {
        assert_eq!(
            parse_lora_file("runs/a:b/style.safetensors:-0.5"),
            Some(("runs/a:b/style.safetensors".into(), -0.5))
        );
        assert_eq!(
            parse_lora_file("style.SAFETENSORS"),
            Some(("style.SAFETENSORS".into(), 1.0))
        );
        // Not a number or not finite: part of the name.
        assert_eq!(parse_lora_file("style.safetensors:inf"), None);
        assert_eq!(parse_lora_file("a=out/adapter:0.7"), None);
        assert_eq!(parse_lora_file("a=out/adapter"), None);
    }

    #[test]
    fn adapter_specs_parse_and_bad_ones_say_how_to_fix_them() {
        assert_eq!(
            parse_adapter("a=runs/x:y/adapter:-0.25").unwrap(),
            AdapterArg {
                name: "a".into(),
                dir: "runs/x:y/adapter".into(),
                weight: -0.25
            }
        );
        for (spec, needle) in [
            ("a=dir:abc", "`abc` is not a number"),
            ("dir:0.5", "no `=`"),
            ("a=dir", "no `:WEIGHT`"),
            ("default=dir:1", "name of the combined adapter"),
            ("a=dir:inf", "not a finite number"),
        ] {
            let err = parse_adapter(spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
            assert!(err.contains("NAME=DIR:WEIGHT"), "{spec}: {err}");
        }
    }
}
