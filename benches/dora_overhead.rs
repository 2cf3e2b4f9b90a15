//! DoRA's training-step overhead over LoRA, ours next to PyTorch + PEFT's on the same shapes.
//!
//! One linear layer `d -> d` with an adapter of rank `r` (LoRA, then the same config with
//! `use_dora`), forward + backward of `sum(layer(x))` with `x` requiring a gradient (as inside a
//! network), at the shapes of `lora_linear.rs`: all-MiniLM-L6-v2's (16 x 64 tokens, 384, r 8) and
//! a Llama-1B-like one (4 x 128 tokens, 2048, r 16). LoRA and DoRA steps alternate in rounds and
//! the ratio is the median of the per-round ratios, so a load change on the machine moves both.
//! The peer (`benches/peer/dora_overhead.py`) does the same with `get_peft_model`.
//!
//! `RAYON_NUM_THREADS=2 cargo bench --bench dora_overhead` (`BENCH_NO_PEER=1` skips the peer,
//! `PEFT_PEER_PYTHON` picks its interpreter, `BENCH_ROUNDS` / `BENCH_ITERS` the sampling). Writes
//! `benches/results/dora_overhead.{json,md}` (or `$BENCH_OUT_DIR`).

use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use burn_peft::prelude::*;
use serde_json::{Value, json};

/// A one-layer model so `PeftModel` can inject into `proj`.
#[derive(Module, Debug, Adaptable)]
struct Wrap {
    proj: Linear,
}

/// `(name, [batch, seq], d, r)`; the peer uses the same list.
const SHAPES: [(&str, [usize; 2], usize, usize); 2] = [
    ("minilm_16x64_384_r8", [16, 64], 384, 8),
    ("llama1b_4x128_2048_r16", [4, 128], 2048, 16),
];

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn layer(d: usize, r: usize, use_dora: bool, device: &Device) -> PeftModel<Wrap> {
    let mut model = PeftModel::new(Wrap {
        proj: LinearConfig::new(d, d).init(device),
    });
    let config = LoraConfig {
        r,
        lora_alpha: 2.0 * r as f64,
        target_modules: Some(["proj"].into()),
        init_lora_weights: InitLoraWeights::Bool(false),
        use_dora,
        ..Default::default()
    };
    model.add_adapter("default", &config).expect("inject");
    model
}

/// Seconds of `iters` training steps.
fn time_steps(model: &PeftModel<Wrap>, x0: &Tensor<3>, iters: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..iters {
        let x = x0.clone().require_grad();
        let grads = model.model().proj.forward(x).sum().backward();
        black_box(grads);
    }
    start.elapsed().as_secs_f64() / iters as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run_peer(out: &std::path::Path) -> Option<Value> {
    if std::env::var("BENCH_NO_PEER").is_ok_and(|v| v == "1") {
        return None;
    }
    let python = std::env::var("PEFT_PEER_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/peer/dora_overhead.py");
    let json_path = out.join("dora_overhead_peer.json");
    let threads = env_usize("RAYON_NUM_THREADS", 2).to_string();
    let status = Command::new(&python)
        .arg(&script)
        .args(["--threads", &threads, "--json"])
        .arg(&json_path)
        .status();
    match status {
        Ok(s) if s.success() => {
            let text = std::fs::read_to_string(&json_path).ok()?;
            let _ = std::fs::remove_file(&json_path);
            serde_json::from_str(&text).ok()
        }
        other => {
            eprintln!("NOTE: the PyTorch + PEFT peer did not run ({other:?}); ours alone");
            None
        }
    }
}

fn main() {
    let rounds = env_usize("BENCH_ROUNDS", 7);
    let iters = env_usize("BENCH_ITERS", 5);
    let device = Device::flex().autodiff();
    let load_before = load_average();
    let mut rows = Vec::new();
    for (name, [b, s], d, r) in SHAPES {
        let x0 = Tensor::<3>::random([b, s, d], Distribution::Normal(0.0, 1.0), &device);
        let lora = layer(d, r, false, &device);
        let dora = layer(d, r, true, &device);
        time_steps(&lora, &x0, 2);
        time_steps(&dora, &x0, 2);
        let (mut t_lora, mut t_dora, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let l = time_steps(&lora, &x0, iters);
            let k = time_steps(&dora, &x0, iters);
            t_lora.push(l);
            t_dora.push(k);
            ratios.push(k / l);
        }
        let row = json!({
            "shape": name,
            "lora_ms": median(t_lora) * 1e3,
            "dora_ms": median(t_dora) * 1e3,
            "ratio": median(ratios),
        });
        println!(
            "ours {name}: lora {:.2} ms, dora {:.2} ms, dora/lora {:.2}x",
            row["lora_ms"].as_f64().unwrap(),
            row["dora_ms"].as_f64().unwrap(),
            row["ratio"].as_f64().unwrap()
        );
        rows.push(row);
    }
    let out = std::env::var("BENCH_OUT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results"));
    std::fs::create_dir_all(&out).expect("results folder");
    let peer = run_peer(&out);
    let load_after = load_average();
    let mut md = format!(
        "# DoRA step-time overhead over LoRA (one linear layer, forward + backward)\n\n\
         Load average before / after: {load_before} / {load_after} (2 cores; other builds ran in \
         parallel: compare ratios, not times).\n\n\
         | shape | ours LoRA ms | ours DoRA ms | ours DoRA/LoRA | PEFT LoRA ms | PEFT DoRA ms | PEFT DoRA/LoRA |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for row in &rows {
        let name = row["shape"].as_str().unwrap();
        let p = peer.as_ref().and_then(|p| p["shapes"].get(name));
        let cell = |key: &str, scale: f64, unit: &str| {
            p.and_then(|p| p[key].as_f64())
                .map(|v| format!("{:.2}{unit}", v * scale))
                .unwrap_or_else(|| "-".into())
        };
        md.push_str(&format!(
            "| {name} | {:.2} | {:.2} | {:.2}x | {} | {} | {} |\n",
            row["lora_ms"].as_f64().unwrap(),
            row["dora_ms"].as_f64().unwrap(),
            row["ratio"].as_f64().unwrap(),
            cell("lora", 1e3, ""),
            cell("dora", 1e3, ""),
            cell("ratio", 1.0, "x"),
        ));
    }
    print!("{md}");
    let report = json!({
        "load_before": load_before,
        "load_after": load_after,
        "rounds": rounds,
        "iters": iters,
        "ours": rows,
        "peer": peer,
    });
    std::fs::write(
        out.join("dora_overhead.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("write json");
    std::fs::write(out.join("dora_overhead.md"), md).expect("write md");
}
