//! Criterion micro-benches of the LoRA linear layer and of adapter hot swap.
//!
//! - `lora_linear_train/<shape>/<variant>`: forward + backward of one linear layer whose input
//!   requires a gradient (as inside a network), at the all-MiniLM-L6-v2 shape (16 x 64 tokens,
//!   384 -> 384, r 8) and a Llama-1B-like shape (4 x 128 tokens, 2048 -> 2048, r 16). Variants:
//!   `plain-frozen` (`burn::nn::Linear`, frozen weight), `plain-trainable` (the weight trains: full
//!   fine-tuning), `burn-peft-lora` (`peft_core::nn::Linear` with a LoRA adapter injected by
//!   `PeftModel`: activation-space `(x·A)·B`), `burn-apply-lora` (Burn's `Module::apply_lora` on
//!   `burn::nn::Linear`: weight-space `x·(W + s·A·B)`).
//! - `lora_linear_infer/<shape>/<variant>`: forward only on the plain CPU device: `plain`,
//!   `burn-peft-unmerged`, `burn-peft-merged` (after `merge_and_unload`), `burn-apply-lora`.
//! - `hot_swap/*`: on all-MiniLM-L6-v2 (from the Hugging Face cache; the tiny BERT fixture if it
//!   is missing): `load_adapter` + `set_adapter` of an r 8 query/value bundle from disk, and
//!   `set_adapter` between two loaded adapters.
//!
//! `cargo bench --bench lora_linear` (threads: `RAYON_NUM_THREADS`, see benches/README.md).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use burn::module::{Lora, Module};
use burn::tensor::{Device, Distribution, Tensor};
use burn_peft::models::{HfModel, Task, from_pretrained};
use burn_peft::prelude::*;
use criterion::{Criterion, criterion_group, criterion_main};

/// A one-layer model so `PeftModel` can inject into `proj`.
#[derive(Module, Debug, Adaptable)]
struct Wrap {
    proj: Linear,
}

struct Shape {
    name: &'static str,
    tokens: [usize; 2],
    d: usize,
    r: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "minilm_16x64_384_r8",
        tokens: [16, 64],
        d: 384,
        r: 8,
    },
    Shape {
        name: "llama1b_4x128_2048_r16",
        tokens: [4, 128],
        d: 2048,
        r: 16,
    },
];

fn lora_config(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: 2.0 * r as f64,
        target_modules: Some(["proj"].into()),
        // A non-zero B, so the adapter is not the identity (the cost is the same either way).
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    }
}

fn peft_layer(shape: &Shape, device: &Device) -> PeftModel<Wrap> {
    let base = Wrap {
        proj: LinearConfig::new(shape.d, shape.d).init(device),
    };
    let mut model = PeftModel::new(base);
    model
        .add_adapter("default", &lora_config(shape.r))
        .expect("inject LoRA");
    model
}

fn burn_layer(shape: &Shape, device: &Device) -> burn::nn::Linear {
    burn::nn::LinearConfig::new(shape.d, shape.d)
        .with_layout(burn::nn::LinearLayout::Row)
        .init(device)
}

fn input(shape: &Shape, device: &Device) -> Tensor<3> {
    let [b, s] = shape.tokens;
    Tensor::random([b, s, shape.d], Distribution::Normal(0.0, 1.0), device)
}

fn bench_train(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    for shape in &SHAPES {
        let mut group = c.benchmark_group(format!("lora_linear_train/{}", shape.name));
        if shape.d >= 1024 {
            group.sample_size(10);
            group.measurement_time(Duration::from_secs(8));
        }
        let x0 = input(shape, &device);

        let frozen = burn_layer(shape, &device).freeze();
        group.bench_function("plain-frozen", |b| {
            b.iter(|| {
                let x = x0.clone().require_grad();
                let grads = frozen.forward(x).sum().backward();
                black_box(grads);
            })
        });

        let trainable = burn_layer(shape, &device);
        group.bench_function("plain-trainable", |b| {
            b.iter(|| {
                let x = x0.clone().require_grad();
                let grads = trainable.forward(x).sum().backward();
                black_box(grads);
            })
        });

        let ours = peft_layer(shape, &device);
        group.bench_function("burn-peft-lora", |b| {
            b.iter(|| {
                let x = x0.clone().require_grad();
                let grads = ours.model().proj.forward(x).sum().backward();
                black_box(grads);
            })
        });

        let theirs =
            burn_layer(shape, &device).apply_lora(Lora::new(shape.r, 2.0 * shape.r as f64));
        group.bench_function("burn-apply-lora", |b| {
            b.iter(|| {
                let x = x0.clone().require_grad();
                let grads = theirs.forward(x).sum().backward();
                black_box(grads);
            })
        });
        group.finish();
    }
}

fn bench_infer(c: &mut Criterion) {
    let device = Device::flex();
    for shape in &SHAPES {
        let mut group = c.benchmark_group(format!("lora_linear_infer/{}", shape.name));
        if shape.d >= 1024 {
            group.sample_size(20);
        }
        let x = input(shape, &device);
        let run = |f: &dyn Fn(Tensor<3>) -> Tensor<3>| {
            let y = f(x.clone());
            black_box(y.into_data());
        };

        let plain = burn_layer(shape, &device);
        group.bench_function("plain", |b| b.iter(|| run(&|x| plain.forward(x))));

        let ours = peft_layer(shape, &device);
        group.bench_function("burn-peft-unmerged", |b| {
            b.iter(|| run(&|x| ours.model().proj.forward(x)))
        });
        let merged = ours.merge_and_unload().expect("merge");
        group.bench_function("burn-peft-merged", |b| {
            b.iter(|| run(&|x| merged.proj.forward(x)))
        });

        let theirs =
            burn_layer(shape, &device).apply_lora(Lora::new(shape.r, 2.0 * shape.r as f64));
        group.bench_function("burn-apply-lora", |b| {
            b.iter(|| run(&|x| theirs.forward(x)))
        });
        group.finish();
    }
}

fn hot_swap_model(device: &Device) -> (HfModel, &'static str) {
    match from_pretrained(
        "sentence-transformers/all-MiniLM-L6-v2",
        Task::Encoder,
        device,
    ) {
        Ok(p) => (p.model, "minilm"),
        Err(e) => {
            eprintln!(
                "NOTE: all-MiniLM-L6-v2 is not in the Hugging Face cache ({e}); hot swap runs on \
                 the tiny BERT fixture instead (scripts/fetch-minilm.sh fetches MiniLM)"
            );
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/bert");
            let p = from_pretrained(dir.to_str().expect("utf-8 path"), Task::Encoder, device)
                .expect("the tiny BERT fixture");
            (p.model, "tiny-bert")
        }
    }
}

fn bench_hot_swap(c: &mut Criterion) {
    let device = Device::flex();
    let (model, which) = hot_swap_model(&device);
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Some(["query", "value"].into()),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    // Two bundles written by the library, as a user would have them on disk.
    let mut peft = PeftModel::new(model);
    peft.add_adapter("a", &config).expect("inject a");
    peft.add_adapter("b", &config).expect("inject b");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    peft.save_adapter(&dir_a, "a").expect("save a");
    peft.save_adapter(&dir_b, "b").expect("save b");
    peft.delete_adapter("b").expect("delete b");
    // `save_adapter` puts a non-default adapter under `dir/<name>`.
    let bundle_b = burn_peft::core::bundle::adapter_dir(&dir_b, "b");

    let mut group = c.benchmark_group(format!("hot_swap/{which}_r8_qv"));
    group.bench_function("load_adapter+set_adapter", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                peft.load_adapter(&bundle_b, "b").expect("load b");
                peft.set_adapter("b").expect("activate b");
                total += t.elapsed();
                peft.set_adapter("a").expect("activate a");
                peft.delete_adapter("b").expect("delete b");
            }
            total
        })
    });
    peft.load_adapter(&bundle_b, "b").expect("load b");
    group.bench_function("set_adapter(switch a<->b)", |b| {
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            peft.set_adapter(if flip { "b" } else { "a" })
                .expect("switch adapter");
        })
    });
    group.finish();
}

criterion_group!(benches, bench_train, bench_infer, bench_hot_swap);
criterion_main!(benches);
