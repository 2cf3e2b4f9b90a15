//! SmolLM2-135M's shape (Llama, 30 layers, hidden 576, GQA 9/3, vocab 49,152, tied head) with
//! its real weights (the Q4_1 GGUF of `scripts/fetch-smollm2.sh`, dequantized to f32, as the
//! peer's transformers GGUF reader does), against PyTorch + PEFT (`benches/peer/llm_shape.py`)
//! in the same invocation, on the same threads:
//!
//! - LoRA step tokens/s (r 16, alpha 32, no dropout, AdamW, clipping at 1.0, synthetic tokens)
//!   at 2 x 128 on q_proj/v_proj, 4 x 256 on q_proj/v_proj, 2 x 128 on all seven linears,
//!   through the trainer's own step;
//! - greedy decode tokens/s: batch 1 (a 32-token prompt, 128 new tokens) with the f32 base and
//!   with a bf16 base, and batches of 8 and 32 prompts of 24 to 32 tokens (left-padded, 64
//!   new tokens each);
//! - the peak RSS of each.
//!
//! Every configuration runs in a fresh process (this binary with `--child`, the peer script),
//! ours and the peer's alternating, `--runs N` times (3 by default): the machine is shared and
//! noisy, so the table reports the median of each. Writes `benches/results/llm_shape.{json,md}`.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench --bench llm_shape -- --runs 3
//! ```

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use burn_peft::core::PeftModel;
use burn_peft::core::nn::ForwardContext;
use burn_peft::core::precision::BaseDType;
use burn_peft::models::base_dtype::apply_base_dtype;
use burn_peft::models::{GenerationConfig, generate_batch};
use serde_json::{Value, json};
use support::{median, mib, ratio, run_child, run_peer, tps};

const STEPS: usize = 3;
const ALL_LINEARS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// One row of the table: what runs, for us and for the peer.
struct Row {
    key: &'static str,
    label: &'static str,
    ours: Vec<String>,
    peer: Vec<String>,
}

fn rows(file: &Path, threads: usize) -> Vec<Row> {
    let file = file.display().to_string();
    let t = threads.to_string();
    let step = |key, label, batch: usize, seq: usize, targets: &str| Row {
        key,
        label,
        ours: vec![
            "step".into(),
            file.clone(),
            batch.to_string(),
            seq.to_string(),
            targets.into(),
        ],
        peer: [
            "step",
            "--batch",
            &batch.to_string(),
            "--seq",
            &seq.to_string(),
        ]
        .into_iter()
        .chain([
            "--targets",
            targets,
            "--steps",
            &STEPS.to_string(),
            "--threads",
            &t,
        ])
        .map(String::from)
        .collect(),
    };
    let decode = |key, label, batch: usize, new: usize, dtype: &str| Row {
        key,
        label,
        ours: vec![
            "decode".into(),
            file.clone(),
            batch.to_string(),
            new.to_string(),
            dtype.into(),
        ],
        peer: [
            "decode",
            "--gguf",
            &file,
            "--batch",
            &batch.to_string(),
            "--new",
        ]
        .into_iter()
        .chain([new.to_string().as_str(), "--threads", &t])
        .chain([
            "--dtype",
            if dtype == "f32" {
                "float32"
            } else {
                "bfloat16"
            },
        ])
        .map(String::from)
        .collect(),
    };
    vec![
        step("step_qv_2x128", "LoRA step 2 x 128, q,v", 2, 128, "qv"),
        step("step_qv_4x256", "LoRA step 4 x 256, q,v", 4, 256, "qv"),
        step(
            "step_all_2x128",
            "LoRA step 2 x 128, all 7 linears",
            2,
            128,
            "all",
        ),
        decode(
            "decode_b1_f32",
            "greedy decode, batch 1, f32",
            1,
            128,
            "f32",
        ),
        decode(
            "decode_b1_bf16",
            "greedy decode, batch 1, bf16 base",
            1,
            128,
            "bf16",
        ),
        decode("decode_b8_f32", "greedy decode, batch 8, f32", 8, 64, "f32"),
        decode(
            "decode_b32_f32",
            "greedy decode, batch 32, f32",
            32,
            64,
            "f32",
        ),
    ]
}

/// Row `row`'s prompt: 32 - (row % 9) tokens (the peer's `prompt_ids`).
fn prompt_ids(row: usize, vocab: usize) -> Vec<i64> {
    (0..32 - row % 9)
        .map(|j| ((row * 7919 + j * 104_729 + 11) % (vocab - 2) + 2) as i64)
        .collect()
}

fn child_step(file: &str, batch: usize, seq: usize, targets: &str) -> Value {
    let targets: &[&str] = if targets == "qv" {
        &["q_proj", "v_proj"]
    } else {
        &ALL_LINEARS
    };
    // The trainer's step: forward + loss (over the vocabulary in chunks), backward, the clip to
    // 1.0, AdamW.
    let mut step = support::LoraStep::new(Path::new(file), targets, batch, seq);
    step.run(0);
    let start = Instant::now();
    let losses: Vec<f32> = (1..=STEPS).map(|seed| step.run(seed).0).collect();
    let seconds = start.elapsed().as_secs_f64();
    let tokens = (batch * seq * STEPS) as f64;
    json!({"tokens_per_sec": tokens / seconds, "step_seconds": seconds / STEPS as f64,
           "losses": losses, "peak_rss_bytes": support::peak_rss()})
}

fn child_decode(file: &str, batch: usize, new: usize, dtype: &str) -> Value {
    let device = Device::flex();
    let mut model = PeftModel::new(support::load_gguf(Path::new(file), true, &device));
    if dtype == "bf16" {
        apply_base_dtype(&mut model, BaseDType::BF16, &device).expect("a bf16 base on flex");
    }
    let model = model.model();
    let prompts: Vec<Vec<i64>> = (0..batch)
        .map(|r| prompt_ids(r, model.vocab_size()))
        .collect();
    let config = |n| GenerationConfig {
        max_new_tokens: n,
        // Every row makes all its tokens, as the peer's `min_new_tokens`.
        eos_token_ids: Vec::new(),
        ..Default::default()
    };
    let ctx = ForwardContext::default();
    generate_batch(model, &prompts, &ctx, &config(4), &device).unwrap();
    let start = Instant::now();
    let out = generate_batch(model, &prompts, &ctx, &config(new), &device).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let made: usize = out
        .iter()
        .zip(&prompts)
        .map(|(o, p)| o.len() - p.len())
        .sum();
    json!({"tokens_per_sec": made as f64 / seconds, "seconds": seconds, "new_tokens": made,
           "first_ids": &out[0][prompts[0].len()..][..8.min(new)],
           "peak_rss_bytes": support::peak_rss()})
}

fn child(args: &[String]) -> Value {
    let n = |i: usize| args[i].parse::<usize>().expect("a count");
    match args[0].as_str() {
        "step" => child_step(&args[1], n(2), n(3), &args[4]),
        "decode" => child_decode(&args[1], n(2), n(3), &args[4]),
        other => panic!("unknown child `{other}`"),
    }
}

/// The median of `key` over `runs`, as a value row (`missing` kept when every run lacks it).
fn median_row(runs: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    for key in ["tokens_per_sec", "peak_rss_bytes"] {
        let mut values: Vec<f64> = runs.iter().filter_map(|r| r[key].as_f64()).collect();
        if let Some(m) = median(&mut values) {
            out.insert(key.into(), json!(m));
        }
    }
    if out.is_empty()
        && let Some(missing) = runs.iter().find_map(|r| r.get("missing"))
    {
        out.insert("missing".into(), missing.clone());
    }
    out.insert("runs".into(), json!(runs));
    Value::Object(out)
}

fn main() {
    if let Some(args) = support::child_args() {
        println!("{}", child(&args));
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let only: Option<&String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1));
    let threads = support::threads();
    let file = support::smollm2();
    eprintln!(
        "llm_shape: {} on {threads} threads, {runs} run(s)",
        file.display()
    );
    let table: Vec<Row> = rows(&file, threads)
        .into_iter()
        .filter(|r| only.is_none_or(|o| r.key.contains(o.as_str())))
        .collect();
    let mut ours: Vec<Vec<Value>> = vec![Vec::new(); table.len()];
    let mut peers: Vec<Vec<Value>> = vec![Vec::new(); table.len()];
    for run in 0..runs {
        for (i, row) in table.iter().enumerate() {
            eprintln!("  run {} {} ...", run + 1, row.key);
            let refs: Vec<&str> = row.ours.iter().map(String::as_str).collect();
            ours[i].push(run_child(&refs));
            peers[i].push(run_peer("llm_shape.py", &row.peer));
        }
    }
    let mut results = serde_json::Map::new();
    let mut md = format!(
        "# SmolLM2-135M shape: burn-peft vs PyTorch + PEFT, {threads} threads\n\n\
         Real SmolLM2-135M-Instruct weights (the Q4_1 GGUF dequantized to f32 on both sides); \
         LoRA r 16 / alpha 32, no dropout, AdamW, clipping at 1.0, synthetic tokens, the \
         trainer's own step; greedy decode with the KV cache (batch 1: a 32-token prompt and \
         128 new tokens; batches: prompts of 24 to 32 tokens left-padded, 64 new tokens). \
         Median of {runs} alternating run(s), each configuration in a fresh process.\n\n\
         | run | burn-peft tokens/s | PyTorch + PEFT tokens/s | ratio | burn-peft peak RSS (MiB) | PyTorch peak RSS (MiB) | RSS ratio |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for (i, row) in table.iter().enumerate() {
        let (o, p) = (median_row(&ours[i]), median_row(&peers[i]));
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            row.label,
            tps(&o),
            tps(&p),
            ratio(&o, &p, "tokens_per_sec"),
            mib(&o),
            mib(&p),
            ratio(&o, &p, "peak_rss_bytes"),
        ));
        results.insert(row.key.into(), json!({"burn_peft": o, "pytorch_peft": p}));
    }
    md.push_str(
        "\nRatios are burn-peft / PyTorch (throughput: higher is better; RSS: lower is better). \
         Targets (issue \"Speed where LLM users feel it\"): LoRA steps >= 1.5x, batch-1 f32 \
         decode >= 1.5x, batch-32 decode >= 2x.\n",
    );
    let stem = if only.is_some() {
        "llm_shape_partial"
    } else {
        "llm_shape"
    };
    support::write_results(stem, threads, results, &md);
}
