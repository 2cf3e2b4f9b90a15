//! `burn-peft train <config.yaml>`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use peft_core::PeftModel;
use peft_models::chat::ChatTemplate;
use peft_models::{HfTokenizer, Task, from_pretrained, load_tokenizer_and_chat, read_config};
use peft_train::data::{
    DATA_CONFIG_FILE, DataConfig, Example, ImagePreprocess, LabelMap, TaskKind, load_examples,
    load_image_examples, pack,
};
use peft_train::{Datasets, EvalReport, FullExport, TrainOptions, Trainer};
use serde_json::json;

use crate::config::{self, MethodChoice};

/// Arguments of `burn-peft train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The YAML run config (see examples/lora-minilm-debian.yaml).
    config: PathBuf,
    /// Resume from a checkpoint folder (`<output>/checkpoints/step-N`), or `latest`.
    #[arg(long)]
    resume: Option<String>,
    /// Override `train.max_steps` (a quick run).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Override `output`.
    #[arg(long)]
    output: Option<PathBuf>,
    /// No progress bar and no step lines: only the run's summary lines and errors.
    #[arg(long)]
    quiet: bool,
    /// Backend: `flex` (CPU), `cuda[:N]` or `vulkan[:N]` (`burn-peft devices` lists them);
    /// overrides the config's `device`.
    #[arg(long)]
    device: Option<String>,
    /// Precision of the frozen base weights: `f32`, `f16`, `bf16`, or quantized (QLoRA):
    /// `nf4`, `q8` (adapters stay f32); overrides the config's `dtype`.
    #[arg(long, value_parser = crate::device::parse_dtype)]
    dtype: Option<peft_core::precision::BaseDType>,
    /// Start over in an output folder that holds a run: its checkpoints, bundles and
    /// TensorBoard files are removed first (without it, such a folder is an error).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Resume a checkpoint written with another config (data, batch size, seed, ...).
    #[arg(long, requires = "resume")]
    force_resume: bool,
    /// Override a config key: `--set train.learning_rate=2e-4`, `--set data.max_length=64`,
    /// `--set method.target_modules=[q_proj,v_proj]` (repeatable; YAML values).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = config::parse_set)]
    set: Vec<config::SetValue>,
    /// Check the config, the data and the model (targets included), print the plan (steps,
    /// examples, trainable parameters, output) and stop before training; writes nothing.
    #[arg(long)]
    dry_run: bool,
}

fn load_data(
    run: &config::RunConfig,
    tokenizer: &HfTokenizer,
    chat: Option<&ChatTemplate>,
    fixed_labels: Option<&LabelMap>,
) -> Result<Datasets> {
    let kind = run.model.task;
    let reader = run.data.reader();
    let (train, found) = load_examples(
        &run.data.train,
        kind,
        &reader,
        tokenizer,
        chat,
        fixed_labels,
    )?;
    let labels = fixed_labels.cloned().or(found);
    let read = |file: &Option<PathBuf>| -> Result<Option<Vec<Example>>> {
        match file {
            Some(f) => Ok(Some(
                load_examples(f, kind, &reader, tokenizer, chat, labels.as_ref())?.0,
            )),
            None => Ok(None),
        }
    };
    Ok(Datasets {
        eval: read(&run.data.eval)?,
        test: read(&run.data.test)?,
        train,
        labels,
    })
}

/// What a text model reads its data with.
struct TextParts {
    tokenizer: HfTokenizer,
    chat: Option<ChatTemplate>,
}

/// The tokenizer and chat template of a text model (its folder's `tokenizer.json`, or a GGUF
/// file's metadata; `data.chat_template` replaces the template), and the default
/// `data.max_length`, which never exceeds the model's `position_limit`.
fn load_text_parts(
    run: &mut config::RunConfig,
    position_limit: Option<(usize, &'static str)>,
) -> Result<TextParts> {
    let source = run.model.name_or_path.clone();
    let source = source.as_str();
    let parts = load_tokenizer_and_chat(source).with_context(|| {
        format!(
            "model `{source}` needs a tokenizer (tokenizer.json, or a GGUF file's tokenizer.ggml.*)"
        )
    })?;
    let chat = match &run.data.chat_template {
        Some(file) => Some(read_chat_template(file, parts.special_tokens)?),
        None => parts.template,
    };
    if run.data.max_length.is_none()
        && let Some((limit, _)) = position_limit
    {
        run.data.max_length = Some(DataConfig::default().max_length.min(limit));
    }
    Ok(TextParts {
        tokenizer: parts.tokenizer,
        chat,
    })
}

/// The splits of an image model: image folders or pixel CSVs, preprocessed as the model's
/// folder says (`preprocessor_config.json`; ImageNet's statistics without one) at
/// `data.image_size` when set.
fn load_image_data(run: &config::RunConfig, model_dir: &Path, channels: usize) -> Result<Datasets> {
    let reader = run.data.reader();
    let pre = ImagePreprocess::for_model(model_dir, channels, reader.image_size)?;
    let shape = reader.image_shape.as_deref();
    let (train, labels) = load_image_examples(&run.data.train, &pre, shape, None)?;
    let read = |file: &Option<PathBuf>| -> Result<Option<Vec<Example>>> {
        match file {
            Some(f) => Ok(Some(
                load_image_examples(f, &pre, shape, labels.as_ref())?.0,
            )),
            None => Ok(None),
        }
    };
    Ok(Datasets {
        eval: read(&run.data.eval)?,
        test: read(&run.data.test)?,
        train,
        labels,
    })
}

/// Every token id of the data is inside the model's vocabulary (a tokenizer of another model
/// gives ids the embedding table does not have): else the file and line of the first one.
fn check_vocabulary(run: &config::RunConfig, data: &Datasets, vocab: usize) -> Result<()> {
    let splits = [
        (Some(&data.train), Some(&run.data.train)),
        (data.eval.as_ref(), run.data.eval.as_ref()),
        (data.test.as_ref(), run.data.test.as_ref()),
    ];
    for (examples, file) in splits {
        let (Some(examples), Some(file)) = (examples, file) else {
            continue;
        };
        for example in examples {
            if let Some(id) = example
                .input_ids
                .iter()
                .find(|&&id| id < 0 || id as u64 >= vocab as u64)
            {
                return Err(peft_models::ModelError::InputOutOfRange {
                    input: format!("{}:{}", file.display(), example.line),
                    found: format!("the tokenizer gave token id {id}"),
                    limit: format!("the model's vocabulary has {vocab} ids"),
                    fix: "use the tokenizer of the model being trained (tokenizer.json in its folder)"
                        .into(),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// An adapter the model refuses, as a config error at the line of the key it is about
/// (`target_modules: [q_proj]` on a BERT model names the line and the model's names).
fn method_error(file: &Path, name: &str, e: peft_core::PeftError) -> anyhow::Error {
    let key = match &e {
        peft_core::PeftError::TargetNotFound { field, .. } => Some(field.as_str()),
        peft_core::PeftError::InvalidConfig { key, .. } => Some(key.as_str()),
        _ => None,
    };
    let line = key.and_then(|k| {
        config::line_in_file(file, "method", k).or_else(|| config::line_in_file(file, "methods", k))
    });
    config::ConfigError {
        file: file.to_path_buf(),
        line,
        message: format!("in `method` (adapter `{name}`): {e}"),
    }
    .into()
}

/// Run the subcommand.
pub fn run(args: TrainArgs) -> Result<()> {
    let loaded = config::load_with(&args.config, args.output.as_deref(), &args.set)?;
    let mut run = loaded.config;
    if args.max_steps.is_some() {
        run.train.max_steps = args.max_steps;
    }
    if args.quiet {
        run.train.progress = false;
    }
    if let Some(device) = args.device {
        run.device = device;
    }
    if let Some(dtype) = args.dtype {
        run.dtype = dtype;
    }
    let device = crate::device::parse(&run.device)?;
    run.dtype
        .check_device(&device)
        .with_context(|| format!("{}: dtype {}", args.config.display(), run.dtype))?;
    let train_device = device.clone().autodiff();
    train_device.seed(run.train.seed);

    let source = &run.model.name_or_path.clone();
    let (model_dir, model_config) =
        read_config(source).with_context(|| format!("resolving model `{source}`"))?;
    // An image model reads images (an image folder or a pixel CSV); a text model tokens.
    let (text, data) = match model_config.image_channels() {
        Some(channels) => {
            if run.model.task != TaskKind::Classification {
                return Err(config::ConfigError {
                    file: args.config.clone(),
                    line: config::line_in_file(&args.config, "model", "task"),
                    message: format!(
                        "model.task: `{source}` is an image model, which trains for \
                         classification only; set `task: classification`"
                    ),
                }
                .into());
            }
            (None, load_image_data(&run, &model_dir, channels)?)
        }
        None => {
            // The config was read above: its position table bounds the default max length.
            let text = load_text_parts(&mut run, model_config.position_limit())?;
            let data = load_data(&run, &text.tokenizer, text.chat.as_ref(), None)?;
            (Some(text), data)
        }
    };
    let chat = text.as_ref().and_then(|t| t.chat.as_ref());
    let task = match run.model.task {
        TaskKind::Classification => {
            let found = data.labels.as_ref().map_or(0, LabelMap::len);
            let num_labels = run.model.num_labels.unwrap_or(found);
            if num_labels < found {
                return Err(config::ConfigError {
                    file: args.config.clone(),
                    line: None,
                    message: format!(
                        "model.num_labels is {num_labels} but {} has {found} distinct labels; raise num_labels or remove it",
                        run.data.train.display()
                    ),
                }
                .into());
            }
            Task::SequenceClassification { num_labels }
        }
        TaskKind::CausalLm => Task::CausalLm,
    };
    let started = Instant::now();
    let pretrained = from_pretrained(source, task, &train_device)
        .with_context(|| format!("loading model `{source}`"))?;
    // Full fine-tuning and the linear probe train base weights: the whole model is saved.
    let full = matches!(loaded.method, MethodChoice::Full | MethodChoice::Head);
    let mut model = PeftModel::new(pretrained.model).with_base_model_name(source.clone());
    let mut adapters: Vec<String> = Vec::new();
    match &loaded.method {
        MethodChoice::Peft(methods) => {
            for (name, method) in methods {
                model
                    .add_adapter(name, method.as_ref())
                    .map_err(|e| method_error(&args.config, name, e))?;
                adapters.push(name.clone());
            }
            // All of them active (and trainable) together, as the trainer runs them: the
            // report below counts every adapter's parameters, not only the first's.
            let names: Vec<&str> = adapters.iter().map(String::as_str).collect();
            model.set_adapters(&names)?;
        }
        MethodChoice::Full => model.set_train_base(true)?,
        MethodChoice::Head => {
            let head = peft_core::Adaptable::classifier_head(model.model()).ok_or_else(|| {
                config::ConfigError {
                    file: args.config.clone(),
                    line: None,
                    message: format!(
                        "method: head trains a classification head, and `{source}` loaded as a \
                     {} has none; set `model.task: classification`",
                        task
                    ),
                }
            })?;
            model.set_train_modules(&[head.as_str()])?;
        }
    }
    crate::device::cast_base(&mut model, run.dtype, &train_device)?;
    // Refuse inputs the model cannot take before any step runs: examples longer than its
    // position table (a prefix included) and ids beyond its vocabulary.
    if text.is_some() {
        model
            .model()
            .check_sequence_length(run.data.reader().max_length, "data.max_length")
            .with_context(|| format!("{}: in `data`", args.config.display()))?;
        check_vocabulary(&run, &data, model.model().vocab_size())?;
    }
    let report = model.trainable_report();
    println!(
        "{}: {} on {} ({} train / {} eval / {} test examples)",
        args.config.display(),
        if matches!(loaded.method, MethodChoice::Head) {
            "the classification head alone (linear probe)".to_string()
        } else if full {
            "full fine-tuning".to_string()
        } else {
            peft_train::method_name(&model, &adapters)
        },
        source,
        data.train.len(),
        data.eval.as_ref().map_or(0, Vec::len),
        data.test.as_ref().map_or(0, Vec::len),
    );
    println!("{report}");
    println!(
        "device: {}{}",
        peft_train::device::describe(&device),
        match run.dtype {
            peft_core::precision::BaseDType::F32 => String::new(),
            d => format!(", frozen base in {d}"),
        }
    );
    let mut data = data;
    if run.data.packing == Some(true) {
        let examples = data.train.len();
        let tokens: usize = data.train.iter().map(|e| e.input_ids.len()).sum();
        let max_length = run.data.reader().max_length;
        data.train = pack(&data.train, max_length);
        let rows = data.train.len();
        println!(
            "packing: {examples} training examples in {rows} rows of up to {max_length} tokens ({:.0}% filled)",
            100.0 * tokens as f64 / (rows.max(1) * max_length) as f64
        );
    }
    if args.dry_run {
        let c = &run.train;
        println!(
            "plan: {} steps ({} epoch(s) of {} training rows, batch {} x {} accumulated), \
             learning rate {:e}, max length {}",
            c.total_steps(data.train.len()),
            c.epochs,
            data.train.len(),
            c.batch_size,
            c.grad_accum,
            c.learning_rate,
            run.data.reader().max_length,
        );
        println!(
            "output: {} ({})",
            run.output.display(),
            if run.output.join("results.json").is_file() {
                "holds a run: pass --overwrite or --resume"
            } else {
                "new"
            }
        );
        println!("dry run: the config, data and model check out; nothing was trained or written");
        return Ok(());
    }

    // The trainer creates the output folder once its checks pass: a refused run writes nothing.
    let trained_on_chat =
        crate::eval_chat::is_conversational(&run.data.train, &run.data.reader().messages_field);
    // results.json: which config and model, before what the run did.
    let summary_fields = vec![
        (
            "config".to_string(),
            json!(config::normalized(&args.config)),
        ),
        ("model".to_string(), json!(source)),
    ];
    let mut builder = Trainer::builder(model, task)
        .adapters(adapters.clone())
        .config(run.train.clone())
        .output_dir(run.output.clone())
        .device(train_device)
        .pad_id(text.as_ref().map_or(0, |t| t.tokenizer.pad_id() as i64))
        // How the data was read (`max_length`, field names): `eval` reads it the same way.
        .bundle_file(
            DATA_CONFIG_FILE,
            serde_json::to_vec_pretty(&run.data.reader())?,
        )
        .summary_field(summary_fields[0].0.clone(), summary_fields[0].1.clone())
        .summary_field(summary_fields[1].0.clone(), summary_fields[1].1.clone());
    // The template the conversations were rendered with travels with the adapter: `serve`
    // (and transformers) use a bundle's own template, so the model is served with the
    // prompts it learned.
    if let Some(template) = chat.filter(|_| trained_on_chat) {
        builder = builder.bundle_file("chat_template.jinja", template.source());
    }
    if full {
        builder = builder.full_export(FullExport {
            config: pretrained.config.clone(),
            source_dir: pretrained.dir.clone(),
            labels: data.labels.as_ref().map(|l| l.names.clone()),
        });
    }
    let mut trainer = builder.build()?;
    let resume = match args.resume.as_deref() {
        Some("latest") => Some(
            peft_train::checkpoint::latest(&run.output.join("checkpoints")).ok_or_else(|| {
                crate::UsageError(format!(
                    "--resume latest: no checkpoint under {}; train without --resume first",
                    run.output.join("checkpoints").display()
                ))
            })?,
        ),
        Some(dir) => Some(PathBuf::from(dir)),
        None => None,
    };
    let options = TrainOptions {
        overwrite: args.overwrite,
        force_resume: args.force_resume,
    };
    // Training, the label map, the held-out test with the best adapter and results.json.
    let summary = trainer.fit(&data, resume.as_deref(), options)?;
    let train_seconds = started.elapsed().as_secs_f64();
    let result_dir = summary.result_dir.clone();
    println!(
        "trained {} steps: {:.1} s of steps ({:.2} steps/s), {:.1} s with loading, evaluation \
         and checkpoints; saved {}",
        summary.steps,
        summary.step_seconds,
        summary.steps_per_sec,
        train_seconds,
        result_dir.display()
    );
    if let Some(eval) = &summary.eval {
        println!("eval (last step): {}", describe(eval));
    }
    let chosen = summary
        .best_dir
        .clone()
        .unwrap_or_else(|| result_dir.clone());
    if let (Some(test), Some(report)) = (&data.test, &summary.test) {
        println!(
            "held-out test ({} examples, {}): {}",
            test.len(),
            chosen.display(),
            describe(report)
        );
    }
    let test_generation = match (&run.data.test, chat, &text) {
        (Some(test), Some(template), Some(TextParts { tokenizer, .. }))
            if crate::eval_chat::is_conversational(test, &run.data.reader().messages_field) =>
        {
            let tuned = reload(source, task, &chosen, &adapters, full, &device)?;
            let eos = peft_models::generate::eos_token_ids(&pretrained.config.raw);
            let scores = generation_scores(&run, test, tuned, template, tokenizer, eos, &device)?;
            Some(scores)
        }
        _ => None,
    };
    // Scored by generation after `fit` wrote results.json: written again with the scores.
    let mut fields = summary_fields;
    fields.push(("test_generation".into(), json!(test_generation)));
    let file = summary.write(&run.output, &fields)?;
    println!("summary: {}", file.display());
    Ok(())
}

/// `data.chat_template`: a Jinja file (at most 1 MiB) compiled with the model's special tokens.
fn read_chat_template(file: &Path, special_tokens: Vec<(String, String)>) -> Result<ChatTemplate> {
    let bad = |reason: String| {
        crate::UsageError(format!("data.chat_template {}: {reason}", file.display()))
    };
    let len = std::fs::metadata(file)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if len > 1 << 20 {
        return Err(bad(format!("{len} bytes; a chat template is at most 1 MiB")).into());
    }
    let source = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
    Ok(ChatTemplate::new(
        file.display().to_string(),
        &source,
        special_tokens,
    )?)
}

/// A conversational test set scored by generation, before training (adapters off) and after:
/// printed, its per-conversation replies written to `test_predictions.jsonl`.
fn generation_scores(
    run: &config::RunConfig,
    test: &Path,
    mut model: PeftModel<peft_models::HfModel>,
    template: &ChatTemplate,
    tokenizer: &HfTokenizer,
    eos: Vec<i64>,
    device: &burn::tensor::Device,
) -> Result<serde_json::Value> {
    use peft_train::chat_eval::{ChatEvalConfig, evaluate_chat, load_conversations};
    crate::device::cast_base(&mut model, run.dtype, device)?;
    let conversations = load_conversations(test, &run.data.reader().messages_field)?;
    let config = ChatEvalConfig {
        max_new_tokens: run.data.max_new_tokens.unwrap_or(32),
        batch_size: run.train.eval_batch_size.unwrap_or(run.train.batch_size),
        eos_token_ids: eos,
        progress: run.train.progress,
    };
    let started = Instant::now();
    let score = |model: &PeftModel<peft_models::HfModel>| {
        evaluate_chat(
            model.model(),
            template,
            tokenizer,
            &conversations,
            &config,
            device,
        )
    };
    model.disable_adapters()?;
    let before = score(&model)?;
    model.enable_adapters()?;
    let after = score(&model)?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "held-out generation ({} conversations, {seconds:.1} s): base model {}; trained {}",
        conversations.len(),
        crate::eval_chat::describe(&before),
        crate::eval_chat::describe(&after)
    );
    let predictions: String = after
        .predictions
        .iter()
        .map(|p| serde_json::to_string(p).unwrap_or_default() + "\n")
        .collect();
    let file = run.output.join("test_predictions.jsonl");
    peft_core::atomic::write_file(&file, predictions.as_bytes())?;
    let scores = |r: &peft_train::chat_eval::ChatEvalReport| json!({"exact_match": r.exact_match, "contains_match": r.contains_match});
    Ok(json!({
        "conversations": conversations.len(),
        "max_new_tokens": config.max_new_tokens,
        "before": scores(&before),
        "after": scores(&after),
        "seconds": seconds,
        "predictions": file,
    }))
}

/// A fresh model with the chosen result: the base + the saved bundle, or the saved full model.
fn reload(
    source: &str,
    task: Task,
    chosen: &Path,
    adapters: &[String],
    full: bool,
    device: &burn::tensor::Device,
) -> Result<PeftModel<peft_models::HfModel>> {
    if full {
        let pretrained = from_pretrained(&chosen.to_string_lossy(), task, device)
            .with_context(|| format!("reloading {}", chosen.display()))?;
        return Ok(PeftModel::new(pretrained.model));
    }
    let pretrained = from_pretrained(source, task, device)?;
    let mut model = PeftModel::new(pretrained.model);
    for adapter in adapters {
        let dir = peft_core::bundle::adapter_dir(chosen, adapter);
        model
            .load_adapter(&dir, adapter)
            .with_context(|| format!("reloading {}", dir.display()))?;
    }
    let names: Vec<&str> = adapters.iter().map(String::as_str).collect();
    model.set_adapters(&names)?;
    Ok(model)
}

/// "accuracy 0.8765, macro-F1 0.8701, loss 0.4123" or "perplexity 12.3, loss 2.51".
pub fn describe(report: &EvalReport) -> String {
    let mut parts = Vec::new();
    if let Some(a) = report.accuracy {
        parts.push(format!("accuracy {a:.4}"));
    }
    if let Some(f) = report.macro_f1 {
        parts.push(format!("macro-F1 {f:.4}"));
    }
    if let Some(p) = report.perplexity {
        parts.push(format!("perplexity {p:.3}"));
    }
    parts.push(format!("loss {:.4}", report.loss));
    parts.join(", ")
}
