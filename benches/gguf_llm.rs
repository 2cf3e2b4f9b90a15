//! The real SmolLM2-135M-Instruct Q4_1 GGUF (`scripts/fetch-smollm2.sh`) with its base kept
//! quantized against the same weights in f32: batch-1 greedy decode (tokens/s, peak RSS) and LoRA
//! training steps (tokens/s, peak RSS), next to PyTorch (transformers' GGUF reader, f32) and
//! llama.cpp (PyPI llama-cpp-python, the same Q4_1 file) on the same threads
//! (`benches/peer/gguf_decode.py`; a peer that is not installed is reported as missing).
//!
//! Each configuration runs in a fresh process (this binary re-executed with `--child`), so a
//! peak RSS (`VmHWM`) is that configuration's alone. The f32 rows load the same file and make
//! every quantized site dense (`dequantize_sites`): the same values, as a float32 model holds
//! them. Writes `benches/results/gguf_llm.{json,md}`.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench --profile dev --bench gguf_llm
//! ```

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use burn_peft::models::{GenerationConfig, generate};
use serde_json::{Value, json};
use support::{mib, ratio, tps, write_results};

const NEW_TOKENS: usize = 64;
const TRAIN_BATCH: usize = 4;
const TRAIN_SEQ: usize = 128;
const TRAIN_STEPS: usize = 4;

fn prompt_ids() -> Vec<i64> {
    let bytes =
        std::fs::read(support::repo().join("tests/fixtures/gguf/smollm2_reference.safetensors"))
            .expect("the SmolLM2 reference fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("ids_0")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn child_decode(file: &Path, f32_base: bool) -> Value {
    let device = Device::flex();
    let model = support::load_gguf(file, f32_base, &device);
    let ids = prompt_ids();
    let config = |n| GenerationConfig {
        max_new_tokens: n,
        ..Default::default()
    };
    generate(&model, &ids, &config(4), &device).unwrap();
    let start = Instant::now();
    let out = generate(&model, &ids, &config(NEW_TOKENS), &device).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    // `generate` returns the prompt and the new tokens: count the new ones only, as the peers do.
    let made = &out[ids.len()..];
    json!({"new_tokens": made.len(), "seconds": seconds,
           "tokens_per_sec": made.len() as f64 / seconds,
           "first_ids": &made[..made.len().min(8)], "peak_rss_bytes": support::peak_rss()})
}

/// LoRA steps of `batch` x [`TRAIN_SEQ`] tokens (the shared step, without clipping).
fn child_train(file: &Path, f32_base: bool, batch: usize) -> Value {
    let targets = ["q_proj", "v_proj"];
    let mut step =
        support::LoraStep::with_base(file, f32_base, &targets, batch, TRAIN_SEQ).without_clipping();
    step.run(0);
    let start = Instant::now();
    let losses: Vec<f32> = (1..=TRAIN_STEPS).map(|seed| step.run(seed).0).collect();
    let seconds = start.elapsed().as_secs_f64();
    let tokens = (batch * TRAIN_SEQ * TRAIN_STEPS) as f64;
    json!({"tokens_per_sec": tokens / seconds, "step_seconds": seconds / TRAIN_STEPS as f64,
           "losses": losses, "peak_rss_bytes": support::peak_rss()})
}

fn run_peer(backend: &str, file: &Path, threads: usize) -> Value {
    let args = ["--backend", backend, "--threads", &threads.to_string()]
        .into_iter()
        .chain(["--new", &NEW_TOKENS.to_string(), "--gguf"])
        .map(String::from)
        .chain([file.display().to_string()])
        .collect::<Vec<_>>();
    support::run_peer("gguf_decode.py", &args)
}

/// This binary again, for one configuration.
fn run_child(kind: &str, base: &str, file: &Path) -> Value {
    support::run_child(&[kind, base, &file.display().to_string()])
}

fn main() {
    if let Some(child) = support::child_args() {
        let (kind, base, file) = (&child[0], &child[1], PathBuf::from(&child[2]));
        let f32_base = base == "f32";
        let result = match kind.as_str() {
            "decode" => child_decode(&file, f32_base),
            "train1" => child_train(&file, f32_base, 1),
            _ => child_train(&file, f32_base, TRAIN_BATCH),
        };
        println!("{result}");
        return;
    }
    // `cargo bench` passes `--bench`; anything else is ignored.
    let args: Vec<String> = std::env::args().collect();
    let threads = support::threads();
    let file = support::smollm2();
    eprintln!("gguf_llm: {} on {threads} threads", file.display());
    if args.iter().any(|a| a == "--train-only") {
        train_only(&file, threads);
        return;
    }
    let mut rows = serde_json::Map::new();
    for (name, kind, base) in [
        ("decode_q4", "decode", "q4"),
        ("decode_f32", "decode", "f32"),
        ("train_q4", "train", "q4"),
        ("train_f32", "train", "f32"),
        ("train1_q4", "train1", "q4"),
        ("train1_f32", "train1", "f32"),
    ] {
        eprintln!("  {name} ...");
        rows.insert(name.into(), run_child(kind, base, &file));
    }
    for backend in ["torch", "llamacpp"] {
        eprintln!("  peer {backend} ...");
        rows.insert(format!("peer_{backend}"), run_peer(backend, &file, threads));
    }
    let r = |k: &str| rows[k].clone();
    let (dq, df, tq, tf) = (
        r("decode_q4"),
        r("decode_f32"),
        r("train_q4"),
        r("train_f32"),
    );
    let (t1q, t1f) = (r("train1_q4"), r("train1_f32"));
    let (torch, llama) = (r("peer_torch"), r("peer_llamacpp"));
    let mut md = String::new();
    md.push_str(&format!(
        "# SmolLM2-135M-Instruct Q4_1 GGUF, {threads} threads\n\n\
         Batch-1 greedy decode of {NEW_TOKENS} tokens after a 37-token chat prompt; LoRA (r 16, \
         q_proj/v_proj) steps of {TRAIN_BATCH} x {TRAIN_SEQ} tokens. burn-peft rows: this run's \
         process each; f32 = the same weights dequantized.\n\n\
         | run | tokens/s | peak RSS (MiB) |\n| --- | --- | --- |\n"
    ));
    for (label, v) in [
        ("decode, burn-peft Q4_1 base", &dq),
        ("decode, burn-peft f32", &df),
        ("decode, PyTorch f32 (transformers GGUF)", &torch),
        ("decode, llama.cpp Q4_1", &llama),
        ("LoRA step, burn-peft Q4_1 base", &tq),
        ("LoRA step, burn-peft f32", &tf),
        ("LoRA step 1 x 128, burn-peft Q4_1 base", &t1q),
        ("LoRA step 1 x 128, burn-peft f32", &t1f),
    ] {
        md.push_str(&format!("| {label} | {} | {} |\n", tps(v), mib(v)));
    }
    md.push_str(&format!(
        "\nRatios: decode Q4 / PyTorch f32 {} (target >= 2x), Q4 / llama.cpp {}, Q4 / our f32 {}; \
         peak RSS decode Q4 / f32 {}, LoRA step Q4 / f32 {} at {TRAIN_BATCH} x {TRAIN_SEQ} and \
         {} at 1 x {TRAIN_SEQ} (target <= 0.35x; activations, the same in both, dominate the \
         larger step); LoRA step tokens/s Q4 / f32 {} and {}.\n",
        ratio(&dq, &torch, "tokens_per_sec"),
        ratio(&dq, &llama, "tokens_per_sec"),
        ratio(&dq, &df, "tokens_per_sec"),
        ratio(&dq, &df, "peak_rss_bytes"),
        ratio(&tq, &tf, "peak_rss_bytes"),
        ratio(&t1q, &t1f, "peak_rss_bytes"),
        ratio(&tq, &tf, "tokens_per_sec"),
        ratio(&t1q, &t1f, "tokens_per_sec"),
    ));
    write_results("gguf_llm", threads, rows, &md);
}

/// `--train-only`: the four LoRA-step rows alone (no decode, no peers), written to
/// `benches/results/gguf_llm_train.{json,md}`: the step's peak memory with the quantized base
/// against f32 after a change to the training step, without rerunning the peers.
fn train_only(file: &Path, threads: usize) {
    let mut rows = serde_json::Map::new();
    for (name, kind, base) in [
        ("train_q4", "train", "q4"),
        ("train_f32", "train", "f32"),
        ("train1_q4", "train1", "q4"),
        ("train1_f32", "train1", "f32"),
    ] {
        eprintln!("  {name} ...");
        rows.insert(name.into(), run_child(kind, base, file));
    }
    let r = |k: &str| rows[k].clone();
    let (tq, tf, t1q, t1f) = (
        r("train_q4"),
        r("train_f32"),
        r("train1_q4"),
        r("train1_f32"),
    );
    let mut md = format!(
        "# SmolLM2-135M-Instruct Q4_1 GGUF: LoRA steps, {threads} threads\n\n\
         LoRA (r 16, q_proj/v_proj) steps through the trainer's own step (`forward_loss`: the \
         loss over the 49,152-token vocabulary in chunks of tokens), this run's process each; \
         f32 = the same weights dequantized.\n\n| run | tokens/s | peak RSS (MiB) |\n| --- | --- | --- |\n"
    );
    for (label, v) in [
        ("LoRA step 4 x 128, burn-peft Q4_1 base", &tq),
        ("LoRA step 4 x 128, burn-peft f32", &tf),
        ("LoRA step 1 x 128, burn-peft Q4_1 base", &t1q),
        ("LoRA step 1 x 128, burn-peft f32", &t1f),
    ] {
        md.push_str(&format!("| {label} | {} | {} |\n", tps(v), mib(v)));
    }
    md.push_str(&format!(
        "\nRatios: peak RSS Q4 / f32 {} at {TRAIN_BATCH} x {TRAIN_SEQ} and {} at 1 x {TRAIN_SEQ} \
         (target <= 0.35x); tokens/s Q4 / f32 {} and {}.\n",
        ratio(&tq, &tf, "peak_rss_bytes"),
        ratio(&t1q, &t1f, "peak_rss_bytes"),
        ratio(&tq, &tf, "tokens_per_sec"),
        ratio(&t1q, &t1f, "tokens_per_sec"),
    ));
    write_results("gguf_llm_train", threads, rows, &md);
}
