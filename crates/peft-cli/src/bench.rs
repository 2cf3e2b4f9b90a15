//! `burn-peft bench`: LoRA training steps of a causal LM on synthetic tokens, timed, for
//! comparing devices and frameworks (benches/gpu/ runs it next to PyTorch + PEFT).
//!
//! The model comes from a folder's `config.json`; with no weights there it is randomly
//! initialized (throughput does not depend on the values), so a 1B-class shape needs no
//! multi-GB download. Each step is the trainer's: forward, next-token loss, backward, global
//! gradient-norm clipping, AdamW on the adapter, and one read of the loss and norm from the
//! device. Warm-up steps (kernel compilation, autotuning, lazy initialization) are not timed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use clap::Args;
use peft_core::{PeftModel, TargetModules};
use peft_lora::LoraConfig;
use peft_models::{HfModel, ModelInputs, Task, from_pretrained, read_config};
use peft_train::optim::{AdamW, AdamWSettings, trainable_paths};
use peft_train::{causal_lm_loss_terms, readout};
use serde_json::json;

/// Arguments of `burn-peft bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Folder with a causal LM's `config.json` (weights optional: random when absent), or a
    /// GGUF file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    run_on: crate::device::RunOn,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first (compilation, autotuning).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Modules to adapt (comma-separated HF names).
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    target_modules: Vec<String>,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    learning_rate: f64,
    /// Seed of the weights and the tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A causal LM of the folder's shape: its weights when it has them, else random.
fn load(args: &BenchArgs, device: &Device) -> Result<HfModel> {
    let source = args.model.to_string_lossy().into_owned();
    // A GGUF file holds its weights (kept in their block formats).
    let has_weights = peft_models::gguf::is_gguf(&source)
        || args.model.join("model.safetensors").is_file()
        || args.model.join("model.safetensors.index.json").is_file();
    if has_weights {
        return Ok(from_pretrained(&source, Task::CausalLm, device)?.model);
    }
    let (_, config) = read_config(&source)?;
    let std = initializer_range(&config.file);
    Ok(config
        .build(Task::CausalLm, device)?
        .map(&mut HfInit { std }))
}

/// `initializer_range` of config.json (transformers' default, 0.02, without it).
fn initializer_range(file: &std::path::Path) -> f64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|v| {
            v.get("initializer_range")
                .and_then(serde_json::Value::as_f64)
        })
        .filter(|std| std.is_finite() && *std > 0.0)
        .unwrap_or(0.02)
}

/// transformers' random initialization (`PreTrainedModel._init_weights`): every linear and
/// embedding weight from N(0, `initializer_range`), as the PyTorch half of benches/gpu/ gets. Burn's defaults (Kaiming-uniform linears, N(0, 1) embeddings) start a
/// tied head with logits in the hundreds and a first loss near 250 instead of near
/// ln(vocab). One-dimensional parameters (norm weights at one, biases) keep Burn's values.
struct HfInit {
    std: f64,
}

impl ModuleMapper for HfInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D < 2 {
            return param;
        }
        let std = self.std;
        param.map(|t| Tensor::random(t.shape(), Distribution::Normal(0.0, std), &t.device()))
    }
}

/// SplitMix64: a stream of token ids, the same for every device and run with one seed.
fn tokens(seed: u64, count: usize, vocab: usize) -> Vec<i64> {
    let mut x = seed;
    (0..count)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % vocab as u64) as i64
        })
        .collect()
}

/// Run the subcommand.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.steps == 0 || args.batch_size == 0 || args.seq_len < 2 {
        bail!(crate::UsageError(
            "--steps and --batch-size must be at least 1 and --seq-len at least 2".into()
        ));
    }
    let device = crate::device::parse(&args.run_on.device)?;
    args.run_on.dtype.check_device(&device)?;
    let train_device = device.clone().autodiff();
    train_device.seed(args.seed);
    let started = Instant::now();
    let base = load(&args, &train_device)
        .with_context(|| format!("building the model of {}", args.model.display()))?;
    if !base.is_causal_lm() {
        bail!(crate::UsageError(format!(
            "{}: bench trains a causal LM",
            args.model.display()
        )));
    }
    let vocab = base.vocab_size();
    let mut model = PeftModel::new(base);
    let targets: Vec<&str> = args.target_modules.iter().map(String::as_str).collect();
    let lora = LoraConfig {
        r: args.r,
        lora_alpha: args.lora_alpha,
        lora_dropout: args.lora_dropout,
        target_modules: Some(TargetModules::list(targets)),
        ..Default::default()
    };
    model.add_adapter("default", &lora)?;
    crate::device::cast_base(&mut model, args.run_on.dtype, &train_device)?;
    let report = model.trainable_report();
    eprintln!(
        "bench: {} on {} ({}), {report}",
        args.model.display(),
        peft_train::device::describe(&device),
        args.run_on.dtype
    );

    let trainable = trainable_paths(model.model(), model.trainable_param_ids());
    let mut optim = AdamW::new(AdamWSettings::default());
    let [b, s] = [args.batch_size, args.seq_len];
    let mut step_ms = Vec::new();
    let mut losses = Vec::new();
    let mut peak_reserved = 0u64;
    let mut timed_from = None;
    for step in 0..args.warmup + args.steps {
        if step == args.warmup {
            timed_from = Some(Instant::now());
        }
        let t0 = Instant::now();
        let ids = tokens(args.seed.wrapping_add(step as u64), b * s, vocab);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &train_device);
        let inputs = ModelInputs {
            input_ids: ids.clone(),
            attention_mask: Some(ids.ones_like()),
            token_type_ids: None,
            pixel_values: None,
        };
        let logits = model
            .model()
            .forward(&inputs)?
            .logits
            .context("a causal LM head")?;
        let (loss, _) = causal_lm_loss_terms(logits, ids);
        let value = loss.clone().inner();
        let grads = GradientsParams::from_grads(loss.backward(), model.model());
        let [loss_value, grad_sq] =
            readout::loss_and_grad_sq(&train_device, Some(value), &grads, &trainable);
        let norm = grad_sq.sqrt();
        let clip = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
        model.update(|m| optim.step(args.learning_rate, m, grads, clip));
        if !loss_value.is_finite() {
            bail!("the loss became {loss_value} at step {step}");
        }
        losses.push(loss_value);
        if let Some(usage) = device.memory_pool_usage() {
            peak_reserved = peak_reserved.max(usage.bytes_reserved);
        }
        if step >= args.warmup {
            step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    // The last step's update is still queued: wait for it before stopping the clock.
    device
        .sync()
        .map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
    let timed = timed_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let tokens_per_sec = (b * s * args.steps) as f64 / timed.max(1e-9);
    let result = json!({
        "framework": "burn-peft",
        "device": peft_train::device::describe(&device),
        "dtype": args.run_on.dtype.name(),
        "batch_size": b,
        "seq_len": s,
        "steps": args.steps,
        "warmup": args.warmup,
        "lora": {"r": args.r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "target_modules": args.target_modules},
        "trainable_params": report.trainable,
        "all_params": report.all,
        "tokens_per_sec": tokens_per_sec,
        "step_ms": step_ms,
        "losses": losses,
        "peak_reserved_bytes": (peak_reserved > 0).then_some(peak_reserved),
        "setup_seconds": started.elapsed().as_secs_f64() - timed,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(file) = &args.json {
        peft_core::atomic::write_file(file, &serde_json::to_vec_pretty(&result)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::tokens;

    #[test]
    fn token_stream_is_seeded_and_in_range() {
        let a = tokens(3, 1000, 50);
        assert_eq!(a, tokens(3, 1000, 50));
        assert_ne!(a, tokens(4, 1000, 50));
        assert!(a.iter().all(|t| (0..50).contains(t)));
    }
}
