//! `burn-peft generate`: text from a causal LM, optionally with an adapter.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use peft_models::{GenerationConfig, Task, from_pretrained};

/// Arguments of `burn-peft generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Causal LM: hub id or folder (GPT-2, Llama, Qwen2, Mistral).
    #[arg(long)]
    model: String,
    /// PEFT adapter folder (LoRA or prefix tuning).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
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
    /// Backend: `flex` (CPU) or `cuda`.
    #[arg(long, default_value = "flex")]
    device: String,
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
    let device = crate::device::parse(&args.device)?;
    let pretrained = from_pretrained(&args.model, Task::CausalLm, &device)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let tokenizer = pretrained
        .tokenizer
        .clone()
        .with_context(|| format!("model `{}` has no tokenizer.json", args.model))?;
    let eos = eos_ids(&pretrained.config.raw);
    let model = crate::with_adapter(pretrained.model, args.adapter.as_deref(), args.merge)?;
    let prompt = tokenizer.encode(&args.prompt, None, usize::MAX)?.ids;
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        eos_token_ids: eos,
        use_cache: true,
    };
    let ids = peft_models::generate(model.model(), &prompt, &config, &device)?;
    let text = tokenizer.decode(&ids)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    Ok(())
}
