//! Mixed-adapter batches: one forward of 16 rows in which rows use 1, 4 or 16 different LoRA
//! adapters (PEFT's `adapter_names`), against the same batch on one adapter, on the real
//! all-MiniLM-L6-v2 (r 8 on query/value, 16 x 64 tokens; from the Hugging Face cache, laid there
//! by scripts/fetch-minilm.sh) and the tiny Llama fixture (GQA, r 4 on q/v, 16 x 32 tokens).
//!
//! Rows: `active` (one adapter through `set_adapter`, the plain path), `mixed-1` (a mixed batch
//! whose rows all name one adapter), `mixed-4`, `mixed-16`. The variants run round-robin, so
//! machine load spreads over all of them; the report is the median per variant and the ratio
//! to `active`. Target (reported, never asserted): `mixed-16` <= 1.15x.
//!
//! `cargo bench --bench mixed_batches` writes benches/results/mixed_batches.{json,md}
//! (`MIXED_ROUNDS` sets the rounds, `MIXED_CASE=tiny` keeps the cases whose name contains it).

use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::PeftModel;
use burn_peft::core::nn::ForwardContext;
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use burn_peft::models::{HfModel, ModelInputs, Task, from_pretrained};
use serde_json::json;

const ADAPTERS: usize = 16;
const ROWS: usize = 16;

struct Case {
    name: &'static str,
    source: String,
    task: Task,
    seq: usize,
    targets: [&'static str; 2],
    r: usize,
}

fn cases() -> Vec<Case> {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama_gqa");
    vec![
        Case {
            name: "all-MiniLM-L6-v2",
            source: "sentence-transformers/all-MiniLM-L6-v2".into(),
            task: Task::Encoder,
            seq: 64,
            targets: ["query", "value"],
            r: 8,
        },
        Case {
            name: "tiny-llama-gqa",
            source: tiny.to_string_lossy().into_owned(),
            task: Task::CausalLm,
            seq: 32,
            targets: ["q_proj", "v_proj"],
            r: 4,
        },
    ]
}

fn model_with_adapters(case: &Case, device: &Device) -> PeftModel<HfModel> {
    let pretrained = from_pretrained(&case.source, case.task, device).expect("model");
    let mut model = PeftModel::new(pretrained.model);
    for i in 0..ADAPTERS {
        let lora = LoraConfig {
            r: case.r,
            lora_alpha: 2.0 * case.r as f64,
            target_modules: Some(case.targets.into()),
            init_lora_weights: InitLoraWeights::Bool(false),
            ..Default::default()
        };
        model.add_adapter(&format!("a{i}"), &lora).expect("adapter");
    }
    model.set_adapter("a0").expect("a0");
    model
}

fn inputs(case: &Case, vocab: usize, device: &Device) -> ModelInputs {
    let n = ROWS * case.seq;
    let ids: Vec<i64> = (0..n)
        .map(|i| 1 + (i * 7919 % (vocab - 1)) as i64)
        .collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [ROWS, case.seq]), device);
    ModelInputs {
        attention_mask: Some(ids.ones_like()),
        token_type_ids: None,
        input_ids: ids,
        pixel_values: None,
    }
}

fn time(model: &HfModel, inputs: &ModelInputs, ctx: &ForwardContext) -> f64 {
    let started = Instant::now();
    let out = model.forward_with(inputs, ctx).expect("forward");
    let t = out
        .last_hidden_state
        .or(out.logits)
        .expect("an output")
        .into_data();
    std::hint::black_box(t);
    started.elapsed().as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    let device = Device::flex();
    let rounds: usize = std::env::var("MIXED_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mut results = Vec::new();
    let mut md = String::from(
        "| model | batch | variant | adapters in batch | median ms | vs one adapter |\n| --- | --- | --- | ---: | ---: | ---: |\n",
    );
    // `MIXED_CASE=tiny` runs only the cases whose name contains it (profiling one model).
    let only = std::env::var("MIXED_CASE").unwrap_or_default();
    for case in cases().into_iter().filter(|c| c.name.contains(&only)) {
        let model = model_with_adapters(&case, &device);
        let inputs = inputs(&case, model.model().vocab_size(), &device);
        let names = |distinct: usize| -> Vec<String> {
            (0..ROWS).map(|r| format!("a{}", r % distinct)).collect()
        };
        let ctx = |distinct: usize| {
            let n = names(distinct);
            let refs: Vec<&str> = n.iter().map(String::as_str).collect();
            model.adapter_rows(&refs, &device).expect("rows")
        };
        let variants: Vec<(&str, usize, ForwardContext)> = vec![
            ("active", 1, ForwardContext::default()),
            ("mixed-1", 1, ctx(1)),
            ("mixed-4", 4, ctx(4)),
            ("mixed-16", 16, ctx(16)),
        ];
        let mut times = vec![Vec::new(); variants.len()];
        for round in 0..rounds + 2 {
            for (i, (_, _, c)) in variants.iter().enumerate() {
                let ms = time(model.model(), &inputs, c);
                if round >= 2 {
                    times[i].push(ms);
                }
            }
        }
        let base = median(&mut times[0].clone());
        for ((variant, distinct, _), t) in variants.iter().zip(times.iter_mut()) {
            let m = median(t);
            let ratio = m / base;
            eprintln!("{} {variant}: {m:.1} ms ({ratio:.3}x)", case.name);
            md.push_str(&format!(
                "| {} | {ROWS} x {} | {variant} | {distinct} | {m:.1} | {ratio:.3}x |\n",
                case.name, case.seq
            ));
            results.push(json!({"model": case.name, "rows": ROWS, "seq": case.seq,
                "variant": variant, "adapters": distinct, "median_ms": m, "ratio": ratio}));
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    md.push_str(&format!(
        "\n{rounds} rounds, round-robin; machine load when run: {}\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&out).expect("results folder");
    std::fs::write(out.join("mixed_batches.md"), &md).expect("write");
    std::fs::write(
        out.join("mixed_batches.json"),
        serde_json::to_string_pretty(&results).expect("json"),
    )
    .expect("write");
    println!("{md}");
}
