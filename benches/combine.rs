//! Combination time of `add_weighted_adapter` (PEFT's weighted adapter combination).
//!
//! - `combine/minilm_r8_qv/<type>`: two random r 8 adapters on `query` / `value` of the real
//!   all-MiniLM-L6-v2 (from the Hugging Face cache; the tiny BERT fixture if it is missing),
//!   weights 0.7 / 0.3, `PeftModel::add_weighted_adapter` end to end (injection of the new
//!   adapter, the per-site math on every core, installing the tensors).
//! - `combine/llama1b_r16/<type>`: a Llama-3.2-1B-shaped stack (hidden 2048, 16 layers, GQA:
//!   q/o 2048x2048, k/v 2048->512, gate/up 2048->8192, down 8192->2048), two random r 16
//!   adapters on all seven projections. No base weights are needed: the per-module math
//!   (`peft_lora::combine::combine_factors`) runs over the 112 modules on every core, as
//!   `add_weighted_adapter` does.
//!
//! Types: `linear` (the baseline of the ratios: factor-wise, the cheapest), `cat`, `svd`,
//! `ties` (density 0.5); `ties_svd` on MiniLM only (its dense SVD of each full delta is
//! O(out·in·min(out, in)): minutes per Llama-1B MLP matrix on the host).
//!
//! `cargo bench --bench combine`; a summary with ratios to `linear` and the load average follows
//! Criterion's output (timings under load > 0.7 on 2 cores are not meaningful: see
//! benches/README.md).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use burn_peft::core::{CombinationType, CombineOptions};
use burn_peft::lora::combine::{LoraFactors, MaskKey, Matrix, combine_factors, combined_rank};
use burn_peft::models::{HfModel, Task, from_pretrained};
use burn_peft::prelude::*;
use criterion::Criterion;

/// Per benchmark id, every timed iteration (for the summary).
static TIMES: Mutex<BTreeMap<String, Vec<Duration>>> = Mutex::new(BTreeMap::new());

fn record(id: &str, d: Duration) {
    TIMES
        .lock()
        .expect("times")
        .entry(id.to_string())
        .or_default()
        .push(d);
}

fn options(kind: CombinationType) -> CombineOptions {
    CombineOptions {
        combination_type: kind,
        density: kind.needs_density().then_some(0.5),
        ..Default::default()
    }
}

fn minilm(device: &Device) -> (HfModel, &'static str) {
    match from_pretrained(
        "sentence-transformers/all-MiniLM-L6-v2",
        Task::Encoder,
        device,
    ) {
        Ok(p) => (p.model, "minilm"),
        Err(e) => {
            eprintln!(
                "NOTE: all-MiniLM-L6-v2 is not in the Hugging Face cache ({e}); running on the \
                 tiny BERT fixture instead (scripts/fetch-minilm.sh fetches MiniLM)"
            );
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/bert");
            let p = from_pretrained(dir.to_str().expect("utf-8 path"), Task::Encoder, device)
                .expect("the tiny BERT fixture");
            (p.model, "tiny-bert")
        }
    }
}

fn bench_minilm(c: &mut Criterion) {
    let device = Device::flex();
    let (model, which) = minilm(&device);
    let mut peft = PeftModel::new(model);
    for (name, alpha) in [("a", 16.0), ("b", 8.0)] {
        let config = LoraConfig {
            r: 8,
            lora_alpha: alpha,
            target_modules: Some(["query", "value"].into()),
            init_lora_weights: InitLoraWeights::Bool(false),
            ..Default::default()
        };
        peft.add_adapter(name, &config).expect("inject");
    }
    let group_name = format!("combine/{which}_r8_qv");
    let mut group = c.benchmark_group(&group_name);
    group.sample_size(20);
    for kind in [
        CombinationType::Linear,
        CombinationType::Cat,
        CombinationType::Svd,
        CombinationType::Ties,
        CombinationType::TiesSvd,
    ] {
        let id = format!("{group_name}/{kind}");
        let opts = options(kind);
        group.bench_function(kind.name(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    peft.add_weighted_adapter(&[("a", 0.7), ("b", 0.3)], "mix", &opts)
                        .expect("combine");
                    let d = t.elapsed();
                    record(&id, d);
                    total += d;
                    peft.delete_adapter("mix").expect("delete");
                }
                total
            })
        });
    }
    group.finish();
}

/// A Llama-3.2-1B-shaped layer: (name, in, out) of each projection.
const LLAMA_1B: [(&str, usize, usize); 7] = [
    ("self_attn.q_proj", 2048, 2048),
    ("self_attn.k_proj", 2048, 512),
    ("self_attn.v_proj", 2048, 512),
    ("self_attn.o_proj", 2048, 2048),
    ("mlp.gate_proj", 2048, 8192),
    ("mlp.up_proj", 2048, 8192),
    ("mlp.down_proj", 8192, 2048),
];
const LAYERS: usize = 16;
const RANK: usize = 16;

/// Deterministic values in `[-bound, bound)` (xorshift64*).
fn random(rows: usize, cols: usize, seed: u64, bound: f64) -> Matrix {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values = (0..rows * cols)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let u = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            (2.0 * u - 1.0) * bound
        })
        .collect();
    Matrix::new(rows, cols, values)
}

/// Per module: its path and the two adapters' factors (A `[r, in]` Kaiming-like, B `[out, r]`).
fn llama_stack() -> Vec<(String, [LoraFactors; 2])> {
    let mut modules = Vec::new();
    let mut seed = 1;
    for layer in 0..LAYERS {
        for (name, d_in, d_out) in LLAMA_1B {
            let path = format!("model.layers.{layer}.{name}");
            let adapter = |label: &str, weight: f64, seed: u64| LoraFactors {
                name: label.into(),
                weight,
                scaling: 2.0,
                a: random(RANK, d_in, seed, 1.0 / (d_in as f64).sqrt()),
                b: random(d_out, RANK, seed + 1, 0.05),
            };
            modules.push((path, [adapter("a", 0.7, seed), adapter("b", 0.3, seed + 2)]));
            seed += 4;
        }
    }
    modules
}

/// Every module of the stack, on every core (as `add_weighted_adapter` runs sites).
fn combine_stack(modules: &[(String, [LoraFactors; 2])], opts: &CombineOptions) -> usize {
    let rank =
        combined_rank(opts.combination_type, &[("a", RANK), ("b", RANK)], None).expect("rank");
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let done = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((path, inputs)) = modules.get(i) else {
                        break;
                    };
                    let key = MaskKey {
                        seed: opts.seed,
                        module: path,
                    };
                    let (a, _) = combine_factors(inputs, rank, opts, key).expect("combine");
                    done.fetch_add(a.rows(), Ordering::Relaxed);
                }
            });
        }
    });
    done.into_inner()
}

fn bench_llama(c: &mut Criterion) {
    let modules = llama_stack();
    let group_name = "combine/llama1b_r16";
    let mut group = c.benchmark_group(group_name);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    for kind in [
        CombinationType::Linear,
        CombinationType::Cat,
        CombinationType::Svd,
        CombinationType::Ties,
    ] {
        let id = format!("{group_name}/{kind}");
        let opts = options(kind);
        group.bench_function(kind.name(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    std::hint::black_box(combine_stack(&modules, &opts));
                    let d = t.elapsed();
                    record(&id, d);
                    total += d;
                }
                total
            })
        });
    }
    group.finish();
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn summary() {
    let mut times = TIMES.lock().expect("times");
    if times.is_empty() {
        return;
    }
    println!("\n## add_weighted_adapter combination time (median of every timed iteration)\n");
    println!(
        "load average at the end: {} on {} cores\n",
        load_average(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("| benchmark | type | median | vs linear |");
    println!("| --- | --- | --- | --- |");
    let medians: BTreeMap<String, Duration> = times
        .iter_mut()
        .map(|(k, v)| (k.clone(), median(v)))
        .collect();
    for (id, m) in &medians {
        let (group, kind) = id.rsplit_once('/').expect("group/type");
        let base = medians.get(&format!("{group}/linear"));
        let ratio = base.map_or("-".into(), |b| {
            format!("{:.2}x", m.as_secs_f64() / b.as_secs_f64())
        });
        println!(
            "| {group} | {kind} | {:.2} ms | {ratio} |",
            m.as_secs_f64() * 1e3
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_minilm(&mut c);
    bench_llama(&mut c);
    c.final_summary();
    summary();
}
