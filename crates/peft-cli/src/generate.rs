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
    /// The text to continue (`-` reads it from stdin); repeat it to continue several in one
    /// batch.
    #[arg(long, required_unless_present = "chat", conflicts_with = "chat")]
    prompt: Vec<String>,
    /// A `tokenizer.json` to use when the model folder has none.
    #[arg(long)]
    tokenizer: Option<std::path::PathBuf>,
    /// Stop at this text (repeatable): the output ends before the first stop found.
    #[arg(long)]
    stop: Vec<String>,
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
    /// Tokens to add at most; the prompt and these must fit the model's positions (the
    /// server's rule).
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
    let tokenizer = match (&args.tokenizer, &pretrained.tokenizer) {
        (Some(file), _) => peft_models::HfTokenizer::from_file(file)?,
        (None, Some(tokenizer)) => tokenizer.clone(),
        (None, None) => anyhow::bail!(crate::UsageError(format!(
            "model `{}` has no tokenizer.json: pass --tokenizer path/to/tokenizer.json",
            args.model
        ))),
    };
    let context_limit =
        peft_models::generate_limits::context_limit(&pretrained.model, &pretrained.config.raw);
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
            .map(|p| Ok(tokenizer.encode(&prompt_text(p)?, None, usize::MAX)?.ids))
            .collect::<Result<Vec<_>>>()?
    };
    let prefix = model.model().prefix_len();
    for prompt in &prompts {
        check_room(prompt.len(), prefix, args.max_new_tokens, context_limit)?;
    }
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
            writeln!(
                out,
                "{}",
                cut_at_stop(tokenizer.decode(&reply)?, &args.stop, 0)
            )?;
        } else {
            let prompt_text = tokenizer.decode(prompt)?;
            let text = tokenizer.decode(ids)?;
            // Stops are looked for in the generated part only.
            let start = if text.starts_with(&prompt_text) {
                prompt_text.len()
            } else {
                0
            };
            writeln!(out, "{}", cut_at_stop(text, &args.stop, start))?;
        }
    }
    Ok(())
}

/// A `--prompt` value: `-` is the whole of stdin.
fn prompt_text(value: &str) -> Result<String> {
    if value != "-" {
        return Ok(value.to_string());
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .context("reading the prompt from stdin")?;
    Ok(text)
}

/// `text` up to the first of `stops` found at or after byte `start`.
fn cut_at_stop(mut text: String, stops: &[String], start: usize) -> String {
    let first = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.get(start..)?.find(s.as_str()))
        .min();
    if let Some(at) = first {
        text.truncate(start + at);
    }
    text
}

/// The server's rule ([`room_for`](peft_models::generate_limits::room_for)): the prompt, a
/// prefix-tuning prefix and the new tokens fit the model's positions.
fn check_room(
    prompt: usize,
    prefix: usize,
    new: usize,
    limit: Option<(usize, &'static str)>,
) -> Result<()> {
    use peft_models::generate_limits::{MAX_NEW_TOKENS_WITHOUT_LIMIT, Room, room_for};
    let (limit_n, key) = limit.unwrap_or((0, ""));
    let with_prefix = if prefix > 0 {
        format!(" after the adapter's {prefix} virtual tokens")
    } else {
        String::new()
    };
    let why = match room_for(limit.map(|(n, _)| n), prefix, prompt, new) {
        Room::Fits => return Ok(()),
        Room::OverDefaultCap => format!(
            "--max-new-tokens {new}: the model states no context limit, and at most \
             {MAX_NEW_TOKENS_WITHOUT_LIMIT} new tokens are generated"
        ),
        Room::PromptTooLong => format!(
            "the prompt has {prompt} tokens{with_prefix} and the model has {limit_n} positions \
             ({key}): shorten it"
        ),
        Room::TooManyNew { room } => format!(
            "--max-new-tokens {new}: the prompt has {prompt} tokens{with_prefix} and the model \
             has {limit_n} positions ({key}); at most {room} new tokens fit: pass \
             --max-new-tokens {room}"
        ),
    };
    Err(crate::UsageError(why).into())
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
