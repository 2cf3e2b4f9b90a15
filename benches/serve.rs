//! `burn-peft serve` under load: a bounded loopback load generator (16 concurrent clients, a
//! fixed number of greedy completions each) against servers holding 1, 4, 16 and 64 LoRA
//! adapters, requests spread round-robin over the adapters, at the same offered load; and the
//! same server handling one request at a time (`--max-batch 1`) as the baseline.
//!
//! Reports throughput (generated tokens/s, requests/s) and p50/p99 request latency. Targets
//! (reported, never asserted): 16 adapters >= 0.85x the throughput of 1 adapter; batching >=
//! 3x the one-at-a-time throughput at 16 concurrent clients.
//!
//! Models: the tiny Llama fixture (GQA, 2 layers) and a SmolLM-135M-sized Llama with random
//! weights (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152), written to a temporary
//! folder. Adapters: random LoRA r 8 on q_proj/v_proj (`init_lora_weights: false`).
//!
//! `cargo bench --bench serve` writes benches/results/serve.md. `SERVE_BENCH_SMOL=0` skips the
//! SmolLM-sized model.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use burn_peft::core::PeftModel;
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use burn_peft::models::{HfConfig, Task, from_pretrained, save_pretrained};
use peft_serve::client::Client;
use peft_serve::{ServeConfig, Server};
use serde_json::json;

const ADAPTER_COUNTS: [usize; 4] = [1, 4, 16, 64];
const CLIENTS: usize = 16;

/// The offered load of one model.
struct Load {
    per_client: usize,
    prompt_len: usize,
    max_tokens: usize,
}

struct Outcome {
    tokens: usize,
    requests: usize,
    seconds: f64,
    p50: f64,
    p99: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `n` random LoRA adapters of the model in `source`, saved as PEFT bundles under `dir`.
fn random_adapters(source: &Path, n: usize, dir: &Path) -> Vec<(String, PathBuf)> {
    let device = Device::flex();
    let pretrained =
        from_pretrained(source.to_str().unwrap(), Task::CausalLm, &device).expect("model");
    let mut model = PeftModel::new(pretrained.model);
    (0..n)
        .map(|i| {
            let name = format!("a{i}");
            let lora = LoraConfig {
                r: 8,
                lora_alpha: 16.0,
                target_modules: Some(["q_proj", "v_proj"].into()),
                init_lora_weights: InitLoraWeights::Bool(false),
                ..Default::default()
            };
            model.add_adapter(&name, &lora).expect("adapter");
            // PEFT's layout: an adapter not named `default` goes to `dir/<name>/`.
            model.save_adapter(dir, &name).expect("save adapter");
            let out = dir.join(&name);
            (name, out)
        })
        .collect()
}

/// A Llama of SmolLM-135M's shape with random weights, saved under `dir`.
fn smollm_sized(dir: &Path) -> PathBuf {
    let source = dir.join("smollm-config");
    std::fs::create_dir_all(&source).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "vocab_size": 49152, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": true,
        "initializer_range": 0.02, "bos_token_id": 1, "dtype": "float32"
    });
    std::fs::write(source.join("config.json"), config.to_string()).unwrap();
    let hf = HfConfig::read(&source.join("config.json")).expect("config");
    let device = Device::flex();
    let model = hf.build(Task::CausalLm, &device).expect("build");
    let out = dir.join("smollm-random");
    save_pretrained(&model, &hf, &source, &out, None).expect("save");
    out
}

/// Serve `source` with `adapters`, offer `load` from 16 clients, and measure.
fn run(
    runtime: &tokio::runtime::Runtime,
    source: &Path,
    adapters: &[(String, PathBuf)],
    max_batch: usize,
    load: &Load,
) -> Outcome {
    let config = ServeConfig {
        adapters: adapters.to_vec(),
        max_batch,
        max_queue: 1024,
        request_timeout: Duration::from_secs(600),
        ..ServeConfig::new(source.to_str().unwrap())
    };
    let server = Server::load(&config, &Device::flex()).expect("server");
    let names: Vec<String> = adapters.iter().map(|(n, _)| n.clone()).collect();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = Client::new(listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        let request = |i: usize| {
            let prompt: Vec<i64> = (0..load.prompt_len)
                .map(|j| ((i * 31 + j * 7) % 100 + 3) as i64)
                .collect();
            json!({"model": names[i % names.len()], "prompt": prompt,
                   "max_tokens": load.max_tokens, "temperature": 0})
        };
        // One warm-up request, not measured.
        client
            .post("/v1/completions", &request(0))
            .await
            .expect("warm-up");
        let start = Instant::now();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let client = client.clone();
                let bodies: Vec<_> = (0..load.per_client)
                    .map(|k| request(c * load.per_client + k))
                    .collect();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for body in bodies {
                        let t = Instant::now();
                        let reply = client
                            .post("/v1/completions", &body)
                            .await
                            .expect("request");
                        assert_eq!(reply.status, 200, "{}", reply.text());
                        let tokens = reply.json()["usage"]["completion_tokens"].as_u64().unwrap();
                        out.push((t.elapsed().as_secs_f64(), tokens as usize));
                    }
                    out
                })
            })
            .collect();
        let mut latencies = Vec::new();
        let mut tokens = 0;
        for task in tasks {
            for (latency, n) in task.await.unwrap() {
                latencies.push(latency);
                tokens += n;
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let _ = stop.send(());
        latencies.sort_by(f64::total_cmp);
        Outcome {
            tokens,
            requests: latencies.len(),
            seconds,
            p50: percentile(&latencies, 0.5),
            p99: percentile(&latencies, 0.99),
        }
    })
}

fn report_model(
    out: &mut String,
    runtime: &tokio::runtime::Runtime,
    name: &str,
    source: &Path,
    load: &Load,
    scratch: &Path,
) {
    let adapters = random_adapters(source, 64, &scratch.join(format!("{name}-adapters")));
    let _ = writeln!(
        out,
        "\n## {name}\n\n{CLIENTS} clients x {} greedy requests, {}-token prompts, max_tokens {}.\n",
        load.per_client, load.prompt_len, load.max_tokens
    );
    out.push_str("| server | adapters | tokens/s | requests/s | p50 (s) | p99 (s) | vs 1 adapter | vs one at a time |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let alone = run(runtime, source, &adapters[..16], 1, load);
    let alone_tps = alone.tokens as f64 / alone.seconds;
    let mut one_adapter_tps = None;
    for k in ADAPTER_COUNTS {
        let o = run(runtime, source, &adapters[..k], 64, load);
        let tps = o.tokens as f64 / o.seconds;
        let base = *one_adapter_tps.get_or_insert(tps);
        let _ = writeln!(
            out,
            "| batched (max-batch 64) | {k} | {tps:.1} | {:.2} | {:.3} | {:.3} | {:.2}x | {:.2}x |",
            o.requests as f64 / o.seconds,
            o.p50,
            o.p99,
            tps / base,
            tps / alone_tps
        );
        eprintln!("{name}: {k} adapters: {tps:.1} tokens/s");
    }
    let _ = writeln!(
        out,
        "| one at a time (max-batch 1) | 16 | {alone_tps:.1} | {:.2} | {:.3} | {:.3} | | 1.00x |",
        alone.requests as f64 / alone.seconds,
        alone.p50,
        alone.p99
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = String::from(
        "# burn-peft serve: throughput over many adapters\n\n`cargo bench --bench serve` \
         (benches/serve.rs). Loopback, CPU (flex), greedy; requests round-robin over the \
         adapters; batched = one forward per step over every running sequence, whatever its \
         adapter. Ratios are from one run.\n",
    );
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama_gqa");
    let tiny_load = Load {
        per_client: 4,
        prompt_len: 8,
        max_tokens: 32,
    };
    report_model(
        &mut out,
        &runtime,
        "tiny Llama (GQA, 2 layers)",
        &tiny,
        &tiny_load,
        scratch.path(),
    );
    if std::env::var("SERVE_BENCH_SMOL").map_or(true, |v| v != "0") {
        let smol = smollm_sized(scratch.path());
        let smol_load = Load {
            per_client: 1,
            prompt_len: 16,
            max_tokens: 16,
        };
        report_model(
            &mut out,
            &runtime,
            "SmolLM-135M-sized Llama (random weights)",
            &smol,
            &smol_load,
            scratch.path(),
        );
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        out,
        "\nMachine load (/proc/loadavg) before: `{}`, after: `{}`; other builds ran in \
         parallel, so absolute numbers are noisy; compare ratios.",
        load_before.trim(),
        load_after.trim()
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/serve.md");
    std::fs::write(&path, &out).unwrap();
    println!("{out}");
}
