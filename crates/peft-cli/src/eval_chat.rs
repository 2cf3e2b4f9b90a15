//! `burn-peft eval` on conversations: the model answers each test conversation (rendered with
//! its chat template) and the reply is scored against the reference assistant turn.

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::Device;
use peft_models::chat::{ChatTemplate, template_of_folder};
use peft_models::{Task, from_pretrained};
use peft_train::chat_eval::{ChatEvalConfig, ChatEvalReport, evaluate_chat, load_conversations};
use peft_train::data::DataConfig;

use crate::eval::EvalArgs;

/// Whether `data` is a JSON Lines file whose first row holds a conversation under `field`.
pub fn is_conversational(data: &Path, field: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(data) else {
        return false;
    };
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .is_some_and(|row| row.get(field).is_some())
}

/// Generate and score the replies, with the adapter's own chat template where its folder has
/// one (training saves it there), else the model's.
pub fn run(args: &EvalArgs, reader: &DataConfig, device: &Device) -> Result<()> {
    let conversations = load_conversations(&args.data, &reader.messages_field)?;
    let pretrained = from_pretrained(&args.model, Task::CausalLm, device)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let own = args
        .adapter
        .iter()
        .find_map(|a| template_of_folder(&a.dir).map(|t| (a, t)));
    let template = match own {
        Some((adapter, (name, source))) => Some(
            ChatTemplate::new(
                format!("of adapter {} ({name})", adapter.dir.display()),
                &source,
                pretrained.special_tokens.clone(),
            )
            .map_err(|e| crate::UsageError(e.to_string()))?,
        ),
        None => pretrained.chat()?,
    };
    let template = template.ok_or_else(|| {
        crate::UsageError(format!(
            "{} holds conversations, but model `{}` has no chat template to render them",
            args.data.display(),
            args.model
        ))
    })?;
    let tokenizer = pretrained
        .tokenizer
        .clone()
        .with_context(|| format!("model `{}` has no tokenizer", args.model))?;
    let eos = peft_models::generate::eos_token_ids(&pretrained.config.raw);
    let (mut model, _) =
        crate::adapters::load(pretrained.model, &args.adapter, false, None, device)?;
    crate::device::cast_base(&mut model, args.run_on.dtype, device)?;
    let config = ChatEvalConfig {
        max_new_tokens: args.max_new_tokens,
        batch_size: args.batch_size,
        eos_token_ids: eos,
        progress: true,
    };
    let report = evaluate_chat(
        model.model(),
        &template,
        &tokenizer,
        &conversations,
        &config,
        device,
    )?;
    if let Some(file) = &args.predictions {
        peft_core::atomic::write_file(file, predictions_jsonl(&report).as_bytes())
            .with_context(|| format!("writing predictions to {}", file.display()))?;
    }
    println!(
        "{} ({} conversations): {}",
        args.data.display(),
        report.examples,
        describe(&report)
    );
    Ok(())
}

/// `exact match 0.8125, contains match 0.8438`.
pub fn describe(report: &ChatEvalReport) -> String {
    format!(
        "exact match {:.4}, contains match {:.4}",
        report.exact_match, report.contains_match
    )
}

/// One JSON line per conversation: its line, the reference, the reply and both matches.
fn predictions_jsonl(report: &ChatEvalReport) -> String {
    report
        .predictions
        .iter()
        .map(|p| serde_json::to_string(p).unwrap_or_default() + "\n")
        .collect()
}
