//! Op-level profile of a LoRA training step at SmolLM2-135M's shape (Llama: 30 layers, hidden
//! 576, GQA with 9 query / 3 key-value heads of 64, MLP 1536, vocabulary 49,152, tied head),
//! batch 2 x 128, LoRA r 16 / alpha 32 / no dropout on q_proj and v_proj: the slowest row of
//! `results/llm_shape.md`, broken down as `results/step_profile.md` does for MiniLM, next to the
//! same ops in PyTorch (`peer/llm_profile_ops.py`, PEFT's LoRA on the LoRA rows).
//!
//! - Every kind of op of the step runs alone at the step's shapes through the functions the
//!   model calls (`peft_core::nn::Linear` with LoRA injected by `PeftModel`, `ops::nn::rms_norm`,
//!   `ops::rope`, `models::ops::sdpa` + `merge_heads`, `ops::swiglu`, the trainer's
//!   `chunked_causal_lm_loss` through the tied head), best of `--rounds` (3) rounds over the
//!   list of at least `--iters` (10) runs (small ops: as many as fit in 0.5 s): forward only on
//!   `Device::flex()`, and forward + backward of its sum on `Device::flex().autodiff()` with the
//!   input requiring a gradient and the base weights frozen. "step share" is the count per step
//!   times forward + backward. `(info)` rows (outside the sum): LoRA on all seven linears.
//! - The real step (the trainer's `forward_loss`, backward, the clip to 1.0, AdamW, as
//!   `llm_shape`'s `child_step`, on the real SmolLM2-135M-Instruct weights dequantized to f32)
//!   runs `--steps` (6) times after one warm-up in the same process, spread over the rounds of
//!   ops (a burst of load from other processes then spoils one round); its clip and AdamW
//!   phases are the table's last rows. `unaccounted = step - sum` is what the op table does not
//!   explain: the autodiff graph, allocation and scheduling, and the view ops between the rows.
//!   The peer does the same with transformers' `LlamaForCausalLM` (random init) + PEFT.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 BURN_PEFT_PEER_PYTHON=/work/peervenv/bin/python cargo bench --profile dev --bench llm_profile
//! ```
//!
//! Without the peer (`BURN_PEFT_PEER_PYTHON`, default `python3`, with torch, transformers and
//! peft) its columns read `–`. Writes `results/llm_step_profile.{json,md}`.

#[path = "support/mod.rs"]
mod support;

use std::hint::black_box;
use std::time::Instant;

use burn::module::{Module, Param};
use burn::nn::RmsNormConfig;
use burn::tensor::{Device, Distribution, Int, Tensor};
use burn_peft::core::nn::{EmbeddingConfig, ForwardContext, Linear, LinearConfig};
use burn_peft::core::{Adaptable, PeftModel, TargetModules};
use burn_peft::lora::LoraConfig;
use burn_peft::models::lm_head::LmHead;
use burn_peft::models::ops::{merge_heads, padding_mask, sdpa, split_heads};
use burn_peft::models::rope::{RopeScaling, inv_freq, rope_tables};
use burn_peft::train::{causal_lm_loss_terms, chunk_tokens, chunked_causal_lm_loss};
use serde_json::{Value, json};

const B: usize = 2;
const S: usize = 128;
const H: usize = 576;
const HEADS: usize = 9;
const KV: usize = 3;
const HD: usize = 64;
const INTER: usize = 1536;
const VOCAB: usize = 49_152;

/// A one-layer model so `PeftModel` can inject LoRA into `proj`.
#[derive(Module, Debug, Adaptable)]
struct OneLinear {
    proj: Linear,
}

/// One row: `key` names it in the peer's JSON; `info` rows stay out of the sum.
struct Row {
    key: &'static str,
    label: &'static str,
    count: usize,
    info: bool,
    fwd: Option<f64>,
    both: Option<f64>,
}

/// The linear rows: key, label, in, out, count per step (keys ending in `lora` carry LoRA).
const LINEARS: [(&str, &str, usize, usize, usize); 10] = [
    ("q_lora", "q_proj 576->576 + LoRA", H, H, 30),
    ("v_lora", "v_proj 576->192 + LoRA", H, KV * HD, 30),
    ("k", "k_proj 576->192", H, KV * HD, 30),
    ("o", "o_proj 576->576", H, H, 30),
    ("gate_up", "gate_proj, up_proj 576->1536", H, INTER, 60),
    ("down", "down_proj 1536->576", INTER, H, 30),
    ("k_lora", "(info) k_proj + LoRA", H, KV * HD, 30),
    ("o_lora", "(info) o_proj + LoRA", H, H, 30),
    ("gate_up_lora", "(info) gate, up + LoRA", H, INTER, 60),
    ("down_lora", "(info) down_proj + LoRA", INTER, H, 30),
];

/// Best of at least `iters` runs, and of as many more as fit in half a second (at most 200):
/// load from other processes only ever adds time, and small ops get many draws.
fn time_ms(iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    let (start, mut best, mut n) = (Instant::now(), f64::INFINITY, 0);
    while n < iters || (start.elapsed().as_secs_f64() < 0.5 && n < 200) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        n += 1;
    }
    best
}

fn leaf<const D: usize>(t: &Tensor<D>, autodiff: bool) -> Tensor<D> {
    if autodiff {
        t.clone().require_grad()
    } else {
        t.clone()
    }
}

/// Forward only: read the output back; autodiff: backpropagate its sum.
fn finish<const D: usize>(y: Tensor<D>, autodiff: bool) {
    if autodiff {
        black_box(y.sum().backward());
    } else {
        black_box(y.into_data());
    }
}

/// A bias-free linear whose weight is stored `[out, in]` and read as its transpose, as every
/// loaded model keeps it (safetensors, GGUF): the layout the step's products take
/// (`peft_ops::few_rows_matmul` reads it in place). `LinearConfig::init` stores `[in, out]`.
fn linear(d_in: usize, d_out: usize, lora: bool, device: &Device) -> OneLinear {
    let mut proj = LinearConfig::new(d_in, d_out).with_bias(false).init(device);
    let stored = Tensor::<2>::random([d_out, d_in], Distribution::Normal(0.0, 0.02), device);
    proj.weight = Param::from_tensor(stored.transpose());
    if !lora {
        return OneLinear {
            proj: proj.freeze(),
        };
    }
    let mut peft = PeftModel::new(OneLinear { proj });
    let config = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        target_modules: Some(TargetModules::list(vec!["proj"])),
        ..Default::default()
    };
    peft.add_adapter("default", &config).expect("inject");
    peft.model().clone()
}

/// Time every kind of op of the step alone, forward only and forward + backward.
fn profile_ops(iters: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for ad in [false, true] {
        let device = if ad {
            Device::flex().autodiff()
        } else {
            Device::flex()
        };
        device.seed(0);
        let rnd =
            |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let fc = ForwardContext::default();
        let (x_h, x_i) = (rnd([B, S, H]), rnd([B, S, INTER]));
        let mut out: Vec<(&'static str, &'static str, usize, f64)> = Vec::new();
        for (key, label, d_in, d_out, count) in LINEARS {
            let layer = linear(d_in, d_out, key.ends_with("lora"), &device);
            let x = if d_in == H { &x_h } else { &x_i };
            let t = time_ms(iters, || {
                finish(layer.proj.forward_in(leaf(x, ad), &fc), ad)
            });
            out.push((key, label, count, t));
        }

        let norm = RmsNormConfig::new(H)
            .with_epsilon(1e-5)
            .init(&device)
            .freeze();
        let t = time_ms(iters, || {
            finish(burn_peft::ops::nn::rms_norm(&norm, leaf(&x_h, ad)), ad)
        });
        out.push(("rms_norm", "rms_norm [2,128,576]", 61, t));

        // RoPE on the heads as the model rotates them: a split-heads view of the projection.
        let positions: Vec<i64> = (0..S as i64).collect();
        let freqs = inv_freq(HD, 100_000.0, &RopeScaling::None);
        let (cos, sin) = rope_tables(&freqs, 1.0, &positions, &device);
        let (q3, k3) = (rnd([B, S, HEADS * HD]), rnd([B, S, KV * HD]));
        for (key, label, x, heads) in [
            ("rope_q", "split heads + rope, q [2,9,128,64]", &q3, HEADS),
            ("rope_k", "split heads + rope, k [2,3,128,64]", &k3, KV),
        ] {
            let t = time_ms(iters, || {
                let x = split_heads(leaf(x, ad), heads);
                finish(burn_peft::ops::rope(x, cos.clone(), sin.clone()), ad)
            });
            out.push((key, label, 30, t));
        }

        // Causal GQA attention as `CausalAttention::attend` runs it after RoPE: the padding
        // mask of an all-ones attention mask, `causal`, the merge before o_proj.
        let rnd4 =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q4, k4, v3) = (
            rnd4([B, HEADS, S, HD]),
            rnd4([B, KV, S, HD]),
            rnd([B, S, KV * HD]),
        );
        let ones = Tensor::<2, Int>::ones([B, S], &device);
        let t = time_ms(iters, || {
            let v = split_heads(leaf(&v3, ad), KV);
            let mask = padding_mask(&ones, HEADS, S);
            let o = sdpa(leaf(&q4, ad), leaf(&k4, ad), v, Some(mask), true, None);
            finish(merge_heads(o), ad)
        });
        out.push(("attention", "causal GQA sdpa + merge [2,9,128,64]", 30, t));

        let x_i2 = rnd([B, S, INTER]);
        let t = time_ms(iters, || {
            finish(burn_peft::ops::swiglu(leaf(&x_i, ad), leaf(&x_i2, ad)), ad)
        });
        out.push(("swiglu", "swiglu [2,128,1536]", 30, t));
        let x_h2 = rnd([B, S, H]);
        let t = time_ms(iters, || finish(leaf(&x_h, ad) + leaf(&x_h2, ad), ad));
        out.push(("residual", "residual add [2,128,576]", 60, t));

        // The frozen table: no gradient flows into it, so both columns time the lookup.
        let table = EmbeddingConfig::new(VOCAB, H).init(&device).freeze();
        let ids =
            Tensor::<2, Int>::random([B, S], Distribution::Uniform(0.0, VOCAB as f64), &device);
        let t = time_ms(iters, || {
            black_box(table.forward_in(ids.clone(), &fc).into_data());
        });
        out.push(("embedding", "embedding lookup [2,128]", 1, t));

        // The tied LM head and the loss as the trainer takes them: forward only, the whole
        // logits (evaluation's way); autodiff, `chunked_causal_lm_loss` (the step's way).
        let head = LmHead {
            linear: None,
            embedding: &table,
            softcap: None,
        };
        let t = time_ms(iters, || {
            if ad {
                let h = leaf(&x_h, ad);
                let loss =
                    chunked_causal_lm_loss(h, &head, ids.clone(), chunk_tokens(VOCAB, &head), &fc);
                black_box(loss.backward());
            } else {
                let (loss, _) = causal_lm_loss_terms(head.logits(x_h.clone(), &fc), ids.clone());
                black_box(loss.into_data());
            }
        });
        out.push(("lm_head_ce", "tied LM head 576->49152 + CE", 1, t));

        for (key, label, count, t) in out {
            match rows.iter_mut().find(|r| r.key == key) {
                Some(r) => r.both = Some(t),
                None => rows.push(Row {
                    key,
                    label,
                    count,
                    info: label.starts_with("(info)"),
                    fwd: Some(t),
                    both: None,
                }),
            }
        }
    }
    rows
}

fn ms_cell(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (iters, steps) = (arg(&args, "--iters", 10), arg(&args, "--steps", 6));
    let (rounds, threads) = (arg(&args, "--rounds", 3), support::threads());
    eprintln!("llm_profile: {rounds} rounds of ops, whole step best of {steps}, {threads} threads");
    // Rounds over the whole op list, the best of each op kept, each followed by its share of
    // the real steps: a burst of load from other processes spoils one round, not a number.
    // The real step of `llm_shape` at 2 x 128 on q,v, warmed up.
    let mut step = support::LoraStep::new(&support::smollm2(), &["q_proj", "v_proj"], B, S);
    step.run(0);
    let (mut rows, mut runs) = (profile_ops(iters), Vec::new());
    for round in 0..rounds {
        if round > 0 {
            for (r, again) in rows.iter_mut().zip(profile_ops(iters)) {
                r.fwd = r.fwd.zip(again.fwd).map(|(a, b)| a.min(b));
                r.both = r.both.zip(again.both).map(|(a, b)| a.min(b));
            }
        }
        while runs.len() < steps * (round + 1) / rounds {
            runs.push(step.run(runs.len() + 1).1);
        }
    }
    let best = |i: usize| runs.iter().map(|r| r[i]).fold(f64::INFINITY, f64::min);
    let all: Vec<f64> = runs.iter().map(|r| r[0]).collect();
    let ours_step = json!({"step_ms": best(0), "forward_loss_ms": best(1), "backward_ms": best(2),
        "clip_ms": best(3), "optim_ms": best(4), "steps_ms": all});
    eprintln!("  the peer ...");
    let peer: Vec<String> =
        format!("--threads {threads} --iters {iters} --steps {steps} --rounds {rounds}")
            .split(' ')
            .map(String::from)
            .collect();
    let torch = support::run_peer("llm_profile_ops.py", &peer);
    if let Some(why) = torch.get("missing") {
        eprintln!("NOTE: no PyTorch numbers ({why})");
    }
    for (key, label, phase) in [
        ("clip", "clip grad norm to 1.0 (LoRA grads)", "clip_ms"),
        ("adamw", "AdamW step (LoRA params)", "optim_ms"),
    ] {
        rows.push(Row {
            key,
            label,
            count: 1,
            info: false,
            fwd: None,
            both: ours_step[phase].as_f64(),
        });
    }
    let torch_step = &torch["step"];
    let peer_op = |key: &str, field: &str| -> Option<f64> {
        match key {
            "clip" if field == "fwd_bwd" => torch_step["clip_ms"].as_f64(),
            "adamw" if field == "fwd_bwd" => torch_step["optim_ms"].as_f64(),
            _ => torch["ops"][key][field].as_f64(),
        }
    };

    let mut md = format!(
        "# LoRA step profile at SmolLM2-135M's shape, batch 2 x 128, {threads} threads\n\n\
         LoRA r 16 / alpha 32, no dropout, on q_proj and v_proj; each op alone at the step's \
         shapes, best of {rounds} rounds of at least {iters} runs (small ops: up to 200 in \
         0.5 s): forward \
         only, and forward + backward with the input requiring a gradient and the base frozen \
         (stored `[out, in]`, as a loaded model keeps it); step share = count x fwd+bwd. Clip and AdamW: best of \
         {steps} real steps. The whole step: best of {steps} after a warm-up, same process, spread \
         over the rounds of ops \
         (ours: real SmolLM2-135M-Instruct weights in f32, the trainer's step; PyTorch: \
         `LlamaForCausalLM` random init + PEFT). `cargo bench --profile dev --bench llm_profile`.\n\n\
         | op | count | ours fwd ms | torch fwd ms | ours fwd+bwd ms | torch fwd+bwd ms | ours step share ms | torch step share ms |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    let mut results = serde_json::Map::new();
    let (mut sum, mut tsum) = (0.0, 0.0);
    // The all-linears variant: the sum with every plain linear row swapped for its LoRA row.
    let (mut all7, mut tall7) = (0.0, 0.0);
    let share = |count: usize, v: Option<f64>| v.map(|v| count as f64 * v);
    for r in &rows {
        let (tf, tb) = (peer_op(r.key, "fwd"), peer_op(r.key, "fwd_bwd"));
        let (s, ts) = (share(r.count, r.both), share(r.count, tb));
        let (s0, ts0) = (s.unwrap_or(0.0), ts.unwrap_or(0.0));
        if !r.info {
            (sum, tsum) = (sum + s0, tsum + ts0);
        }
        // Plain linears that have an `(info)` LoRA twin leave the all-linears sum.
        if r.info || !["k", "o", "gate_up", "down"].contains(&r.key) {
            (all7, tall7) = (all7 + s0, tall7 + ts0);
        }
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.label,
            r.count,
            ms_cell(r.fwd, 2),
            ms_cell(tf, 2),
            ms_cell(r.both, 2),
            ms_cell(tb, 2),
            ms_cell(s, 0),
            ms_cell(ts, 0),
        ));
        results.insert(
            r.key.into(),
            json!({"op": r.label, "count": r.count, "info": r.info, "fwd_ms": r.fwd,
                   "fwd_bwd_ms": r.both, "torch_fwd_ms": tf, "torch_fwd_bwd_ms": tb,
                   "step_share_ms": s, "torch_step_share_ms": ts}),
        );
    }
    let has_torch = torch.get("missing").is_none();
    let t_opt = |v: f64| has_torch.then_some(v);
    let (step, tstep) = (
        ours_step["step_ms"].as_f64(),
        torch_step["step_ms"].as_f64(),
    );
    let (unacc, tunacc) = (step.map(|s| s - sum), tstep.map(|s| s - tsum));
    let bold = |v: Option<f64>| v.map_or("–".into(), |v| format!("**{v:.0}**"));
    md.push_str(&format!(
        "| **sum of the rows above** | | | | | | {} | {} |\n\
         | **measured whole step** | | | | | | {} | {} |\n\
         | **unaccounted = step - sum** | | | | | | {} | {} |\n\
         | (info) sum with LoRA on all 7 linears | | | | | | {} | {} |\n",
        bold(Some(sum)),
        bold(t_opt(tsum)),
        bold(step),
        bold(tstep),
        bold(unacc),
        bold(tunacc),
        ms_cell(Some(all7), 0),
        ms_cell(t_opt(tall7), 0),
    ));
    let phases = |s: &Value| {
        let p = |k: &str| ms_cell(s[k].as_f64(), 0);
        format!(
            "forward + loss {}, backward {}, clip {}, AdamW {} ms",
            p("forward_loss_ms"),
            p("backward_ms"),
            p("clip_ms"),
            p("optim_ms")
        )
    };
    md.push_str(&format!(
        "\nWhole step, best of {steps} per phase: ours {}; PyTorch {}. Every step (ms): ours {}, \
         PyTorch {}.\n",
        phases(&ours_step),
        phases(torch_step),
        ours_step["steps_ms"],
        torch_step.get("steps_ms").unwrap_or(&Value::Null),
    ));
    // Where the unaccounted time sits: the op rows' forward (count x fwd, on a device without
    // autodiff) against the step's forward + loss phase, their backward (count x (fwd+bwd -
    // fwd)) against the backward phase. Our loss runs its backward inside `forward_loss`. The
    // rows' backward carries what recording the graph adds to a forward: only the total is firm.
    let split = |ours: bool| -> Option<(f64, f64)> {
        let (mut f, mut b) = (0.0, 0.0);
        for r in rows.iter().filter(|r| !r.info && r.fwd.is_some()) {
            let (fwd, both) = match ours {
                true => (r.fwd?, r.both?),
                false => (peer_op(r.key, "fwd")?, peer_op(r.key, "fwd_bwd")?),
            };
            let n = r.count as f64;
            match (ours, r.key) {
                (true, "lm_head_ce") => f += n * both,
                _ => (f, b) = (f + n * fwd, b + n * (both - fwd)),
            }
        }
        Some((f, b))
    };
    md.push_str(
        "\nThe unaccounted time by phase (rough: a row's backward is its fwd+bwd less its forward \
         without autodiff, so it carries what recording the graph adds to the forward):\n",
    );
    let mut split_json = serde_json::Map::new();
    for (side, ours, s) in [("ours", true, &ours_step), ("PyTorch", false, torch_step)] {
        let (Some((f, b)), Some(pf), Some(pb)) = (
            split(ours),
            s["forward_loss_ms"].as_f64(),
            s["backward_ms"].as_f64(),
        ) else {
            continue;
        };
        md.push_str(&format!(
            "\n{side}: forward + loss phase {pf:.0} ms vs the rows' forward {f:.0} ms \
             (unaccounted {:.0}); backward phase {pb:.0} ms vs the rows' backward {b:.0} ms \
             (unaccounted {:.0}).\n",
            pf - f,
            pb - b
        ));
        split_json.insert(
            side.into(),
            json!({"rows_forward_ms": f, "rows_backward_ms": b}),
        );
    }
    results.insert("phase_split".into(), Value::Object(split_json));
    results.insert(
        "sum".into(),
        json!({"step_share_ms": sum, "torch_step_share_ms": t_opt(tsum),
               "all_linears_step_share_ms": all7, "torch_all_linears_step_share_ms": t_opt(tall7)}),
    );
    results.insert(
        "whole_step".into(),
        json!({"ours": ours_step, "torch": torch_step, "unaccounted_ms": unacc,
               "torch_unaccounted_ms": tunacc}),
    );
    results.insert("peer".into(), torch.clone());
    support::write_results("llm_step_profile", threads, results, &md);
}
