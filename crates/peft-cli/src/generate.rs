//! `burn-peft generate`: text from a causal LM, optionally with an adapter.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use peft_models::{GenerationConfig, Task, from_pretrained};

use crate::adapters::{AdapterArg, RowNames};

/// Arguments of `burn-peft generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Causal LM: hub id or folder (GPT-2, Llama, Qwen2, Mistral).
    #[arg(long)]
    model: String,
    /// PEFT adapter folder (LoRA, prefix tuning, ...), as `DIR` or `NAME=DIR`; repeat it for
    /// several adapters, which run together unless `--adapter-per-row` is given.
    #[arg(long, value_parser = crate::adapters::parse_adapter)]
    adapter: Vec<AdapterArg>,
    /// The text to continue; repeat it to continue several in one batch.
    #[arg(long, required_unless_present = "chat", conflicts_with = "chat")]
    prompt: Vec<String>,
    /// Chat: answer a conversation rendered with the model's chat template (from
    /// `--system` / `--user`, or `--messages`); prints the reply only.
    #[arg(long)]
    chat: bool,
    /// The system message of a `--chat` conversation.
    #[arg(long, requires = "chat", conflicts_with = "messages")]
    system: Option<String>,
    /// The user message of a `--chat` conversation.
    #[arg(long, requires = "chat", conflicts_with = "messages", required_unless_present_any = ["messages", "prompt"])]
    user: Option<String>,
    /// A JSON file with the conversation of `--chat`: `[{"role": ..., "content": ...}, ...]`
    /// (or an object with `messages`).
    #[arg(long, requires = "chat")]
    messages: Option<std::path::PathBuf>,
    /// One adapter name (or `__base__`) per `--prompt`, comma-separated: each prompt is
    /// continued with its own adapter in one batch.
    #[arg(long, value_parser = crate::adapters::parse_rows)]
    adapter_per_row: Option<RowNames>,
    /// Tokens to add at most.
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    /// 0 = greedy; otherwise sample from logits / temperature.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    temperature: f32,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probability reaches p.
    #[arg(long, value_parser = probability)]
    top_p: Option<f32>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Merge the adapter into the weights first (LoRA; faster generation).
    #[arg(long, requires = "adapter")]
    merge: bool,
    #[command(flatten)]
    run_on: crate::device::RunOn,
}

fn non_negative(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("expected a finite number >= 0, found `{s}`")),
    }
}

fn probability(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("expected a number in (0, 1], found `{s}`")),
    }
}

/// Run the subcommand.
pub fn run(args: GenerateArgs) -> Result<()> {
    let device = crate::device::parse(&args.run_on.device)?;
    let pretrained = from_pretrained(&args.model, Task::CausalLm, &device)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let tokenizer = pretrained
        .tokenizer
        .clone()
        .with_context(|| format!("model `{}` has no tokenizer.json", args.model))?;
    let eos = peft_models::generate::eos_token_ids(&pretrained.config.raw);
    let template = if args.chat { pretrained.chat()? } else { None };
    if let Some(RowNames(rows)) = &args.adapter_per_row
        && rows.len() != args.prompt.len()
    {
        anyhow::bail!(crate::UsageError(format!(
            "--adapter-per-row names {} adapters for {} --prompt values; give one per prompt",
            rows.len(),
            args.prompt.len()
        )));
    }
    let (mut model, ctx) = crate::adapters::load(
        pretrained.model,
        &args.adapter,
        args.merge,
        args.adapter_per_row.as_ref().map(|r| r.0.as_slice()),
        &device,
    )?;
    crate::device::cast_base(&mut model, args.run_on.dtype, &device)?;
    let mut eos = eos;
    let prompts = if args.chat {
        let template = template.ok_or_else(|| {
            crate::UsageError(format!(
                "model `{}` has no chat template (no chat_template.jinja, no chat_template in \
                 tokenizer_config.json or the GGUF metadata): use --prompt",
                args.model
            ))
        })?;
        let messages = conversation(&args)?;
        let options = peft_models::chat::RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let text = template
            .render_with(&messages, &options)
            .map_err(|e| crate::UsageError(e.to_string()))?
            .text;
        eos.extend(
            template
                .special_token("eos_token")
                .and_then(|t| tokenizer.token_to_id(t))
                .map(i64::from),
        );
        vec![tokenizer.encode_plain(&text)?.0]
    } else {
        args.prompt
            .iter()
            .map(|p| Ok(tokenizer.encode(p, None, usize::MAX)?.ids))
            .collect::<Result<Vec<_>>>()?
    };
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        eos_token_ids: eos.clone(),
        use_cache: true,
        pad_token_id: tokenizer.pad_id() as i64,
    };
    let rows = peft_models::generate_batch(model.model(), &prompts, &ctx, &config, &device)?;
    let mut out = std::io::stdout().lock();
    for (ids, prompt) in rows.iter().zip(&prompts) {
        if args.chat {
            // The reply only, without the end-of-turn token.
            let reply: Vec<i64> = ids[prompt.len()..]
                .iter()
                .copied()
                .take_while(|t| !eos.contains(t))
                .collect();
            writeln!(out, "{}", tokenizer.decode(&reply)?)?;
        } else {
            writeln!(out, "{}", tokenizer.decode(ids)?)?;
        }
    }
    Ok(())
}

/// The conversation of `--chat`: `--messages FILE`, else `--system` and `--user`.
fn conversation(args: &GenerateArgs) -> Result<Vec<peft_models::chat::ChatMessage>> {
    use peft_models::chat::ChatMessage;
    let Some(file) = &args.messages else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system.as_str()));
        }
        messages.push(ChatMessage::new(
            "user",
            args.user.clone().unwrap_or_default(),
        ));
        return Ok(messages);
    };
    let bad = |reason: String| crate::UsageError(format!("{}: {reason}", file.display()));
    let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let list = value.get("messages").unwrap_or(&value);
    Ok(peft_train::data::chat::parse_messages(list, false).map_err(bad)?)
}
