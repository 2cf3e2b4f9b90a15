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
    #[arg(long, required = true)]
    prompt: Vec<String>,
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

/// `eos_token_id` of config.json: a number or a list.
fn eos_ids(raw: &serde_json::Value) -> Vec<i64> {
    match raw.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
        _ => Vec::new(),
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
    let eos = eos_ids(&pretrained.config.raw);
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
    let prompts = args
        .prompt
        .iter()
        .map(|p| Ok(tokenizer.encode(p, None, usize::MAX)?.ids))
        .collect::<Result<Vec<_>>>()?;
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        eos_token_ids: eos,
        use_cache: true,
        pad_token_id: tokenizer.pad_id() as i64,
    };
    let rows = peft_models::generate_batch(model.model(), &prompts, &ctx, &config, &device)?;
    let mut out = std::io::stdout().lock();
    for ids in rows {
        writeln!(out, "{}", tokenizer.decode(&ids)?)?;
    }
    Ok(())
}
