//! `burn-peft eval`: metrics of a model (optionally with an adapter) on a labelled file.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use peft_models::{Task, from_pretrained, load_tokenizer, model_dir, read_config};
use peft_train::data::{
    DATA_CONFIG_FILE, DataConfig, ImagePreprocess, LABEL_MAP_FILE, LabelMap, TaskKind,
    load_examples, load_image_examples,
};
use peft_train::evaluate;

use crate::adapters::AdapterArg;

/// Arguments of `burn-peft eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Base model: hub id or folder (for full fine-tuning: the saved `model/` folder).
    #[arg(long)]
    pub(crate) model: String,
    /// PEFT adapter folder (e.g. `<output>/best`), as `DIR` or `NAME=DIR`; repeat it to
    /// evaluate several adapters active together (LoRA + prefix tuning, ...).
    #[arg(long, value_parser = crate::adapters::parse_adapter)]
    pub(crate) adapter: Vec<AdapterArg>,
    /// JSONL or CSV file with `text` and `label` (classification), or `text` / `prompt` +
    /// `completion` (causal LM: loss), or `messages` conversations (causal LM: each ending
    /// with the reference assistant turn; the model's replies are generated and scored by
    /// exact and contains match).
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// `classification` or `causal-lm` (default: the adapter's `task_type`, `SEQ_CLS` or
    /// `CAUSAL_LM`; else classification).
    #[arg(long, value_parser = parse_task)]
    pub(crate) task: Option<TaskKind>,
    /// Class names: a `label_map.json` (default: the adapter's, else the model folder's).
    #[arg(long)]
    labels: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) data_flags: DataFlags,
    /// Examples per batch.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: usize,
    #[command(flatten)]
    pub(crate) run_on: crate::device::RunOn,
    /// Write one JSON line per example: its line in the data file, gold and predicted label
    /// and the class probabilities (classification), or its loss and token count (causal LM).
    #[arg(long)]
    pub(crate) predictions: Option<PathBuf>,
    /// Conversations (`messages` rows, causal LM): tokens per generated reply at most.
    #[arg(long, default_value_t = 32)]
    pub(crate) max_new_tokens: usize,
}

/// The `data:` options of a run config on the command line. Each defaults to what the adapter
/// was trained with (`data_config.json`, written by `burn-peft train` beside it), else to the
/// config's default.
#[derive(Args, Debug, Default)]
pub struct DataFlags {
    /// `jsonl` or `csv` (default: by the file's extension).
    #[arg(long)]
    format: Option<String>,
    /// Field of the text (default `text`).
    #[arg(long)]
    text_field: Option<String>,
    /// Field of the second text of a pair (default `text_pair`).
    #[arg(long)]
    text_pair_field: Option<String>,
    /// Field of the label (default `label`).
    #[arg(long)]
    label_field: Option<String>,
    /// Field of the prompt (causal LM; default `prompt`).
    #[arg(long)]
    prompt_field: Option<String>,
    /// Field of the completion (causal LM; default `completion`).
    #[arg(long)]
    completion_field: Option<String>,
    /// Field of a conversation (causal LM; default `messages`).
    #[arg(long)]
    messages_field: Option<String>,
    /// Most tokens per example (default: the adapter's training length, else 128).
    #[arg(long)]
    max_length: Option<usize>,
}

impl DataFlags {
    /// The reader: these flags over the adapters' recorded data config, over the defaults;
    /// says where `max_length` came from when the adapter set it.
    pub(crate) fn reader(&self, adapters: &[AdapterArg]) -> Result<(DataConfig, Option<String>)> {
        let recorded = adapters
            .iter()
            .map(|a| a.dir.join(DATA_CONFIG_FILE))
            .find(|f| f.is_file());
        let mut cfg = match &recorded {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                serde_json::from_str::<DataConfig>(&text).map_err(|e| {
                    crate::UsageError(format!(
                        "{}: not a data config written by `burn-peft train` ({e}); remove it or \
                         pass the data flags",
                        file.display()
                    ))
                })?
            }
            None => DataConfig::default(),
        };
        let set = |target: &mut String, flag: &Option<String>| {
            if let Some(v) = flag {
                target.clone_from(v);
            }
        };
        if self.format.is_some() {
            cfg.format.clone_from(&self.format);
        }
        set(&mut cfg.text_field, &self.text_field);
        if self.text_pair_field.is_some() {
            cfg.text_pair_field.clone_from(&self.text_pair_field);
        }
        set(&mut cfg.label_field, &self.label_field);
        set(&mut cfg.prompt_field, &self.prompt_field);
        set(&mut cfg.completion_field, &self.completion_field);
        set(&mut cfg.messages_field, &self.messages_field);
        let note = match (self.max_length, &recorded) {
            (Some(n), _) => {
                cfg.max_length = n;
                None
            }
            (None, Some(file)) => Some(format!(
                "max length {} (as the adapter was trained, {}; --max-length to change)",
                cfg.max_length,
                file.display()
            )),
            (None, None) => None,
        };
        if cfg.max_length == 0 {
            bail!(crate::UsageError("--max-length must be at least 1".into()));
        }
        Ok((cfg, note))
    }
}

/// The task: `--task`, else the first adapter's `task_type`, else classification.
fn resolve_task(args: &EvalArgs) -> TaskKind {
    if let Some(task) = args.task {
        return task;
    }
    let from_adapter = args
        .adapter
        .iter()
        .find_map(|a| crate::adapters::task_type(&a.dir));
    match from_adapter.as_deref() {
        Some("CAUSAL_LM") => TaskKind::CausalLm,
        _ => TaskKind::Classification,
    }
}

fn parse_task(s: &str) -> Result<TaskKind, String> {
    match s {
        "classification" => Ok(TaskKind::Classification),
        "causal-lm" => Ok(TaskKind::CausalLm),
        other => Err(format!(
            "unknown task `{other}`; expected `classification` or `causal-lm`"
        )),
    }
}

/// The label map of a run: `--labels`, else `label_map.json` beside the adapter, else the
/// model folder's `id2label`.
fn find_labels(args: &EvalArgs) -> Result<Option<LabelMap>> {
    let mut candidates = Vec::new();
    if let Some(l) = &args.labels {
        candidates.push(l.clone());
    }
    for a in &args.adapter {
        candidates.push(a.dir.join(LABEL_MAP_FILE));
    }
    let dir = model_dir(&args.model)?;
    candidates.push(dir.join(LABEL_MAP_FILE));
    for file in candidates {
        if file.is_file() {
            return Ok(Some(LabelMap::load(&file)?));
        }
    }
    if dir.join("config.json").is_file() {
        // A merged or fully fine-tuned folder carries id2label in config.json.
        let config = dir.join("config.json");
        if let Ok(map) = LabelMap::load(&config) {
            return Ok(Some(map));
        }
    }
    Ok(None)
}

/// Run the subcommand.
pub fn run(args: EvalArgs) -> Result<()> {
    let device = crate::device::parse(&args.run_on.device)?;
    let task_name = resolve_task(&args);
    if !(args.data.is_file() || args.data.is_dir()) {
        bail!(crate::UsageError(format!(
            "--data {}: no such file; pass a JSONL or CSV file of examples (for an image \
             model: an image folder or a pixel CSV)",
            args.data.display()
        )));
    }
    let (reader, note) = args.data_flags.reader(&args.adapter)?;
    let (model_dir, model_config) =
        read_config(&args.model).with_context(|| format!("resolving model `{}`", args.model))?;
    if matches!(task_name, TaskKind::CausalLm)
        && crate::eval_chat::is_conversational(&args.data, &reader.messages_field)
    {
        return crate::eval_chat::run(&args, &reader, &device);
    }
    if let Some(note) = note {
        eprintln!("{note}");
    }
    // An image model reads images (preprocessed as at training: `data_config.json` beside the
    // adapter holds the size and the pixel-CSV shape).
    if let Some(channels) = model_config.image_channels() {
        let Some(labels) = find_labels(&args)? else {
            bail!(crate::UsageError(
                "no label map for classification: pass --labels <label_map.json> (written by `burn-peft train` into its output and adapter folders)".into()
            ));
        };
        let pre = ImagePreprocess::for_model(&model_dir, channels, reader.image_size)?;
        let (examples, _) = load_image_examples(
            &args.data,
            &pre,
            reader.image_shape.as_deref(),
            Some(&labels),
        )?;
        let task = Task::SequenceClassification {
            num_labels: labels.len(),
        };
        return score(&args, examples, task, Some(labels), 0, None, &device);
    }
    let tokenizer = load_tokenizer(&args.model).with_context(|| {
        format!(
            "model `{}` needs a tokenizer (tokenizer.json, or a GGUF file's)",
            args.model
        )
    })?;
    let (task, labels) = match task_name {
        TaskKind::Classification => {
            let Some(labels) = find_labels(&args)? else {
                bail!(crate::UsageError(
                    "no label map for classification: pass --labels <label_map.json> (written by `burn-peft train` into its output and adapter folders), or --task causal-lm for a language model".into()
                ));
            };
            let n = labels.len();
            (Task::SequenceClassification { num_labels: n }, Some(labels))
        }
        TaskKind::CausalLm => (Task::CausalLm, None),
    };
    let kind = task_name;
    let (examples, _) =
        load_examples(&args.data, kind, &reader, &tokenizer, None, labels.as_ref())?;
    score(
        &args,
        examples,
        task,
        labels,
        tokenizer.pad_id() as i64,
        Some(reader.max_length),
        &device,
    )
}

/// Load the model with the adapters, score `examples`, write the predictions and print the
/// report; `max_length` (text) is checked against the model's positions.
fn score(
    args: &EvalArgs,
    examples: Vec<peft_train::data::Example>,
    task: Task,
    labels: Option<LabelMap>,
    pad_id: i64,
    max_length: Option<usize>,
    device: &burn::tensor::Device,
) -> Result<()> {
    let pretrained = from_pretrained(&args.model, task, device)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let (mut model, _) =
        crate::adapters::load(pretrained.model, &args.adapter, false, None, device)?;
    crate::device::cast_base(&mut model, args.run_on.dtype, device)?;
    if let Some(max_length) = max_length {
        model
            .model()
            .check_sequence_length(max_length, "--max-length")?;
    }
    let report = evaluate(
        model.model(),
        &examples,
        task,
        pad_id,
        args.batch_size,
        device,
    )?;
    if let Some(file) = &args.predictions {
        let text = predictions_jsonl(&examples, &report, labels.as_ref());
        peft_core::atomic::write_file(file, text.as_bytes())
            .with_context(|| format!("writing predictions to {}", file.display()))?;
    }
    println!(
        "{} ({} examples): {}",
        args.data.display(),
        examples.len(),
        crate::train::describe(&report)
    );
    Ok(())
}

/// One JSON line per example (see `--predictions`).
fn predictions_jsonl(
    examples: &[peft_train::data::Example],
    report: &peft_train::EvalReport,
    labels: Option<&LabelMap>,
) -> String {
    let name = |id: usize| -> serde_json::Value {
        match labels.and_then(|l| l.name(id)) {
            Some(n) => n.into(),
            None => id.into(),
        }
    };
    let mut out = String::new();
    for (example, result) in examples.iter().zip(&report.examples) {
        let mut row = serde_json::Map::new();
        row.insert("line".into(), example.line.into());
        if let Some(gold) = result.gold {
            row.insert("gold".into(), name(gold));
        }
        if let Some(predicted) = result.predicted {
            row.insert("predicted".into(), name(predicted));
            row.insert("correct".into(), (result.gold == Some(predicted)).into());
            let probabilities: serde_json::Map<String, serde_json::Value> = result
                .probabilities
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let key = labels
                        .and_then(|l| l.name(i))
                        .map(String::from)
                        .unwrap_or_else(|| i.to_string());
                    (key, (*p as f64).into())
                })
                .collect();
            row.insert("probabilities".into(), probabilities.into());
        }
        if let Some(loss) = result.loss {
            row.insert("loss".into(), loss.into());
            if let Some(tokens) = result.tokens {
                row.insert("tokens".into(), tokens.into());
                row.insert("perplexity".into(), loss.exp().into());
            }
        }
        out.push_str(&serde_json::Value::Object(row).to_string());
        out.push('\n');
    }
    out
}
