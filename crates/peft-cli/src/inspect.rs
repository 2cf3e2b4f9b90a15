//! `burn-peft inspect`: what an adapter bundle holds, and whether it fits a base model.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use peft_core::bundle::{self, read_config};
use peft_core::{PeftModel, TensorRole, thousands};
use peft_models::{Task, from_pretrained};
use peft_train::data::{LABEL_MAP_FILE, LabelMap};
use serde_json::Value;

/// Arguments of `burn-peft inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
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
