//! `burn-peft inspect`: what an adapter bundle holds, and whether it fits a base model; or what
//! a kohya / diffusers Stable Diffusion LoRA `.safetensors` file holds.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use peft_core::bundle::{self, read_config};
use peft_core::{PeftModel, TensorRole, thousands};
use peft_lora::kohya::{KohyaError, LoraFile, LoraModule, ModuleKind};
use peft_models::{Task, from_pretrained};
use peft_train::data::{LABEL_MAP_FILE, LabelMap};
use serde_json::Value;

/// Arguments of `burn-peft inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors), or a kohya /
    /// diffusers Stable Diffusion LoRA `.safetensors` file.
    adapter: PathBuf,
    /// Check the bundle against this base model (hub id or folder): every tensor must find its
    /// module with the right shape.
    #[arg(long)]
    model: Option<String>,
    /// Classes of the classifier, when checking a SEQ_CLS bundle without a label_map.json.
    #[arg(long)]
    num_labels: Option<usize>,
    /// Where to load the base model for the check: `flex` (CPU), `cuda[:N]` or `vulkan[:N]`.
    #[arg(long, default_value = "flex")]
    device: String,
}

/// Key segments PEFT's module wrappers add to any method's keys (`<path>.base_layer.bias`,
/// `<path>.weight` of a `modules_to_save` copy); never a module name.
const WRAPPER_SEGMENTS: &[&str] = &["weight", "bias", "modules_to_save", "base_layer"];

/// The module a tensor belongs to, for grouping: the last segment of `path` that is neither a
/// layer index nor a wrapper segment (`query` for `...layer.0.attention.self.query`); a tensor
/// saved under a bare name (no module path) is its own group.
fn module_name(path: &str, key: &str) -> String {
    path.split('.')
        .rev()
        .find(|s| !s.is_empty() && !WRAPPER_SEGMENTS.contains(s) && s.parse::<usize>().is_err())
        .unwrap_or(key)
        .to_string()
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Run the subcommand.
pub fn run(args: InspectArgs) -> Result<()> {
    if args.adapter.is_file()
        && args
            .adapter
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        return describe_lora_file(&args);
    }
    let loaded = read_config(&args.adapter)?;
    let config_file = args.adapter.join(bundle::CONFIG_FILE);
    let raw: Value = serde_json::from_str(&fs::read_to_string(&config_file)?)
        .with_context(|| format!("reading {}", config_file.display()))?;
    let weights = args.adapter.join(bundle::WEIGHTS_FILE);
    let bytes = fs::read(&weights).with_context(|| format!("reading {}", weights.display()))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        peft_core::PeftError::CorruptFile {
            file: weights.clone(),
            reason: e.to_string(),
        }
    })?;
    let peft_type = peft_core::peft_type_of(loaded.method.as_ref());
    // Everything method-specific comes from the method itself (`PeftMethod::describe`).
    let summary = loaded.method.describe();
    // One column for every label, however long the method's keys are.
    let width = summary
        .entries
        .iter()
        .map(|(k, _)| k.len() + 1)
        .chain([8])
        .max()
        .unwrap_or(8)
        + 1;
    let field = |label: &str, value: &dyn std::fmt::Display| {
        println!("{:<width$}{value}", format!("{label}:"));
    };
    field("adapter", &args.adapter.display());
    field("method", &peft_type);
    for (key, value) in &summary.entries {
        field(key, &short(value));
    }
    // Modules touched, grouped by the last path segment (`query`, `value`, …), with ranks.
    let mut params = 0usize;
    let mut by_module: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut by_role: BTreeMap<Option<&TensorRole>, usize> = BTreeMap::new();
    let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
    let mut names: Vec<(String, Vec<usize>, String)> = tensors
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), format!("{:?}", v.dtype())))
        .collect();
    names.sort();
    for (name, shape, _) in &names {
        let n: usize = shape.iter().product();
        params += n;
        let role = summary.role_of(name);
        let path = role.and_then(|r| r.module_of(name)).unwrap_or(name);
        let entry = by_module.entry(module_name(path, name)).or_default();
        entry.0 += 1;
        entry.1 += n;
        *by_role.entry(role).or_default() += 1;
        if let Some(axis) = role.and_then(|r| r.rank_axis)
            && let Some(rank) = shape.get(axis)
        {
            *ranks.entry(*rank).or_default() += 1;
        }
    }
    field(
        "tensors",
        &format!(
            "{} ({} parameters, {:.1} KiB on disk, dtype {})",
            names.len(),
            thousands(params),
            bytes.len() as f64 / 1024.0,
            names.first().map(|(_, _, d)| d.clone()).unwrap_or_default()
        ),
    );
    if !ranks.is_empty() {
        let list: Vec<String> = ranks
            .iter()
            .map(|(r, n)| format!("r={r} on {n} module(s)"))
            .collect();
        field("ranks", &list.join(", "));
    }
    let roles: Vec<(&str, &str, usize)> = by_role
        .iter()
        .map(|(role, count)| match role {
            Some(r) => (r.suffix.as_str(), r.description.as_str(), *count),
            None => (
                "(other)",
                "modules_to_save copies, trained biases, saved base tables",
                *count,
            ),
        })
        .collect();
    let names_width = by_module
        .keys()
        .map(String::len)
        .chain(roles.iter().map(|(name, _, _)| name.len()))
        .max()
        .unwrap_or(0);
    println!("modules:");
    for (module, (count, n)) in &by_module {
        println!(
            "  {module:<names_width$} {count:>4} tensor(s) {:>12} params",
            thousands(*n)
        );
    }
    println!("roles:");
    for (name, what, count) in roles {
        println!("  {name:<names_width$} {count:>4} tensor(s)  {what}");
    }
    let Some(model) = &args.model else {
        return Ok(());
    };
    // Validation: load the bundle into the base model as PEFT would.
    let task = match raw.get("task_type").and_then(Value::as_str) {
        Some("SEQ_CLS") => {
            let labels = args.adapter.join(LABEL_MAP_FILE);
            let num_labels = match args.num_labels {
                Some(n) => n,
                None if labels.is_file() => LabelMap::load(&labels)?.len(),
                None => classifier_rows(&tensors).ok_or_else(|| {
                    crate::UsageError(
                        "SEQ_CLS bundle without label_map.json or a saved classifier: pass --num-labels".into(),
                    )
                })?,
            };
            Task::SequenceClassification { num_labels }
        }
        Some("CAUSAL_LM") => Task::CausalLm,
        // No task type: a saved head copy still says the bundle belongs to a classifier.
        _ => match classifier_rows(&tensors) {
            Some(n) => Task::SequenceClassification {
                num_labels: args.num_labels.unwrap_or(n),
            },
            None => Task::Auto,
        },
    };
    let device = crate::device::parse(&args.device)?;
    let pretrained = from_pretrained(model, task, &device)
        .with_context(|| format!("loading base model `{model}`"))?;
    let mut peft = PeftModel::new(pretrained.model);
    // Trainable, so the report counts what the adapter trains (PEFT's
    // `print_trainable_parameters` after `get_peft_model`), not a frozen inference load.
    let report = peft
        .load_adapter_trainable(&args.adapter, "default")
        .with_context(|| format!("checking {} against `{model}`", args.adapter.display()))?;
    println!("base model `{model}`: every tensor of the bundle fits its module");
    if !report.unknown_config_keys.is_empty() {
        println!(
            "warning: config keys this version does not know (ignored, as PEFT does): {}",
            report.unknown_config_keys.join(", ")
        );
    }
    println!("{}", peft.trainable_report());
    if let Some(base) = raw.get("base_model_name_or_path").and_then(Value::as_str)
        && base != model
    {
        println!(
            "note: the bundle names `{base}` as its base model; it was checked against `{model}`"
        );
    }
    Ok(())
}

/// Rows of a saved classification head (`modules_to_save` copy of `classifier` / `score`).
fn classifier_rows(tensors: &safetensors::SafeTensors<'_>) -> Option<usize> {
    tensors.tensors().into_iter().find_map(|(name, view)| {
        let head = name.contains("classifier") || name.contains("score");
        (head && name.ends_with("weight") && view.shape().len() == 2).then(|| view.shape()[0])
    })
}

/// Describe a kohya / diffusers Stable Diffusion LoRA file (`peft_lora::kohya`): format,
/// networks, modules, ranks, alphas, convolutions (LoCon), DoRA magnitudes, then one line per
/// module with its diffusers path.
fn describe_lora_file(args: &InspectArgs) -> Result<()> {
    if args.model.is_some() {
        return Err(crate::UsageError(format!(
            "--model checks PEFT adapter folders; {} is a single LoRA file",
            args.adapter.display()
        ))
        .into());
    }
    // A file that cannot be read is a failure (exit 1); one that reads but is not a valid LoRA
    // file is bad input (exit 2).
    let lora = LoraFile::read(&args.adapter).map_err(|e| match e {
        KohyaError::Io { .. } => anyhow::Error::new(e),
        other => crate::UsageError(other.to_string()).into(),
    })?;
    let field = |label: &str, value: &dyn std::fmt::Display| {
        println!("{:<10}{value}", format!("{label}:"));
    };
    let counted = |counts: Vec<(String, usize)>| {
        counts
            .iter()
            .map(|(value, n)| format!("{value} on {n} module(s)"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    field("file", &args.adapter.display());
    field("format", &lora.format);
    let networks: Vec<String> = lora
        .networks()
        .iter()
        .map(|net| {
            let n = lora.modules.iter().filter(|m| m.network == *net).count();
            format!("{net} ({n} module(s))")
        })
        .collect();
    field("networks", &networks.join(", "));
    let conv: Vec<&LoraModule> = lora
        .modules
        .iter()
        .filter(|m| matches!(m.kind, ModuleKind::Conv { .. }))
        .collect();
    field(
        "modules",
        &format!(
            "{} ({} linear, {} conv)",
            lora.modules.len(),
            lora.modules.len() - conv.len(),
            conv.len()
        ),
    );
    let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
    for m in &lora.modules {
        *ranks.entry(m.rank).or_default() += 1;
    }
    field(
        "ranks",
        &counted(ranks.iter().map(|(r, n)| (format!("r={r}"), *n)).collect()),
    );
    // Stored alphas by value (in numeric order), then the modules whose alpha is their rank.
    let mut alphas: Vec<(f64, usize)> = Vec::new();
    for m in lora.modules.iter().filter(|m| m.alpha_stored) {
        match alphas.iter_mut().find(|(a, _)| *a == m.alpha) {
            Some((_, n)) => *n += 1,
            None => alphas.push((m.alpha, 1)),
        }
    }
    alphas.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut alpha_counts: Vec<(String, usize)> =
        alphas.iter().map(|(a, n)| (format!("{a}"), *n)).collect();
    let defaulted = lora.modules.iter().filter(|m| !m.alpha_stored).count();
    if defaulted > 0 {
        alpha_counts.push(("= rank (none stored)".into(), defaulted));
    }
    field("alphas", &counted(alpha_counts));
    let mut kernels: BTreeMap<[usize; 2], usize> = BTreeMap::new();
    for m in &conv {
        if let ModuleKind::Conv { kernel } = m.kind {
            *kernels.entry(kernel).or_default() += 1;
        }
    }
    let kernels: Vec<(String, usize)> = kernels
        .iter()
        .map(|(k, n)| (format!("{}x{}", k[0], k[1]), *n))
        .collect();
    field(
        "conv",
        &if conv.is_empty() {
            "none".to_string()
        } else {
            counted(kernels)
        },
    );
    let dora = lora.modules.iter().filter(|m| m.has_dora_scale).count();
    field(
        "dora",
        &if dora == 0 {
            "none".to_string()
        } else {
            format!("magnitude vector on {dora} module(s)")
        },
    );
    let unmapped = lora
        .modules
        .iter()
        .filter(|m| m.diffusers_path.is_none())
        .count();
    if unmapped > 0 {
        field(
            "unmapped",
            &format!(
                "{unmapped} module(s) without a diffusers path (SD 1.x original-checkpoint names such as input_blocks are not mapped)"
            ),
        );
    }
    let width = lora.modules.iter().map(|m| m.name.len()).max().unwrap_or(0);
    println!("per module:");
    for m in &lora.modules {
        let kind = match m.kind {
            ModuleKind::Linear => "linear".to_string(),
            ModuleKind::Conv { kernel } => format!("conv{}x{}", kernel[0], kernel[1]),
        };
        let path = match &m.diffusers_path {
            Some(p) if *p == m.name => String::new(),
            Some(p) => format!("  -> {p}"),
            None => "  -> (no diffusers path)".to_string(),
        };
        println!(
            "  {:<width$}  {kind:<8} {:>5}->{:<5} r={:<3} alpha={:<5} scale={}{}{path}",
            m.name,
            m.in_features,
            m.out_features,
            m.rank,
            m.alpha,
            m.scale(),
            if m.has_dora_scale { "  dora" } else { "" },
        );
    }
    Ok(())
}
