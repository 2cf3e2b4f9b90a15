//! Op-level profile of a MiniLM step (`--profile`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use burn_peft::prelude::*;
use serde_json::{Value, json};

use crate::measure::ms;
use crate::peer::peer_setup;
use crate::report::{f, fmt_opt};
use crate::{BATCH, Res, SEQ, Settings, repo_root};

// ------------------------------------------------------------------------------------------------
// Op-level profile of a MiniLM step (`--profile`)

/// A one-layer model so `PeftModel` can inject LoRA into `proj`.
#[derive(Module, Debug, Adaptable)]
pub(crate) struct OneLinear {
    pub(crate) proj: Linear,
}

pub(crate) fn time_ms(iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f();
        v.push(ms(t));
    }
    // Best of N: load from other processes on the machine only ever adds time.
    v.into_iter().fold(f64::INFINITY, f64::min)
}

/// Time (best of `iters`) every kind of op of an all-MiniLM-L6-v2 forward at batch 16 x 64, alone, forward only
/// (plain device) and forward + backward (autodiff device, input requiring a gradient, frozen
/// weights as in LoRA training), and multiply by how often a step runs it. Returns rows of
/// `(op, count per forward, forward ms, forward+backward ms)` (per single call).
pub(crate) fn profile_ops(iters: usize) -> Vec<(String, usize, f64, f64)> {
    use burn::nn::LayerNormConfig;
    use burn::tensor::Distribution;
    use burn_peft::models::ops::{merge_heads, padding_mask, sdpa, split_heads};
    // The ops the models call (fused on flex; `PEFT_OPS_FUSED=0` times the compositions).
    use burn_peft::ops::gelu;
    use burn_peft::ops::nn::layer_norm;

    let (b, s, h, inter, heads) = (BATCH, SEQ, 384usize, 1536usize, 12usize);
    let mut rows = Vec::new();
    for autodiff in [false, true] {
        let device = if autodiff {
            Device::flex().autodiff()
        } else {
            Device::flex()
        };
        let rnd =
            |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let leaf = |t: &Tensor<3>| {
            if autodiff {
                t.clone().require_grad()
            } else {
                t.clone()
            }
        };
        let finish = |y: Tensor<3>| {
            if autodiff {
                std::hint::black_box(y.sum().backward());
            } else {
                std::hint::black_box(y.into_data());
            }
        };
        let x_h = rnd([b, s, h]);
        let x_i_h = rnd([b, s, h]);
        let x_i = rnd([b, s, inter]);
        let mut out: Vec<(String, usize, f64)> = Vec::new();

        for (name, d_in, d_out, count, x) in [
            ("linear 384->384 (q,k,v,attn-out)", h, h, 24usize, &x_h),
            ("linear 384->1536 (intermediate)", h, inter, 6, &x_h),
            ("linear 1536->384 (output)", inter, h, 6, &x_i),
        ] {
            let layer = LinearConfig::new(d_in, d_out).init(&device).freeze();
            let t = time_ms(iters, || finish(layer.forward(leaf(x))));
            out.push((name.into(), count, t));
        }
        // LoRA r 8 on query/value: the layer with its adapter (dropout 0.1, training) minus the
        // plain layer above.
        let mut peft = PeftModel::new(OneLinear {
            proj: LinearConfig::new(h, h).init(&device),
        });
        peft.add_adapter(
            "default",
            &LoraConfig {
                r: 8,
                lora_alpha: 16.0,
                lora_dropout: 0.1,
                target_modules: Some(["proj"].into()),
                ..Default::default()
            },
        )
        .expect("inject");
        let with_lora = time_ms(iters, || finish(peft.model().proj.forward(leaf(&x_h))));
        out.push(("linear 384->384 + LoRA r8 (q,v)".into(), 12, with_lora));

        // Informational (count 0, outside the sum): the same adapter without dropout, and the
        // intermediate linear on a 2-D input (tokens folded into rows).
        let mut peft0 = PeftModel::new(OneLinear {
            proj: LinearConfig::new(h, h).init(&device),
        });
        peft0
            .add_adapter(
                "default",
                &LoraConfig {
                    r: 8,
                    lora_alpha: 16.0,
                    target_modules: Some(["proj"].into()),
                    ..Default::default()
                },
            )
            .expect("inject");
        let no_dropout = time_ms(iters, || finish(peft0.model().proj.forward(leaf(&x_h))));
        out.push((
            "(info) linear 384->384 + LoRA r8, lora_dropout 0".into(),
            0,
            no_dropout,
        ));
        let up = LinearConfig::new(h, inter).init(&device).freeze();
        let folded = time_ms(iters, || {
            let y = up.forward(leaf(&x_h).reshape([b * s, h]));
            finish(y.reshape([b, s, inter]))
        });
        out.push((
            "(info) linear 384->1536 on a 2-D [1024, 384] input".into(),
            0,
            folded,
        ));

        let gelu_t = time_ms(iters, || finish(gelu(leaf(&x_i))));
        out.push(("gelu (erf) [16,64,1536]".into(), 6, gelu_t));

        // BERT's post-norm `LayerNorm(dense(x) + residual)` (12 per forward, the residual add
        // inside the norm op) and the embeddings' norm (1).
        let norm = LayerNormConfig::new(h).init(&device).freeze();
        let ln_res = time_ms(iters, || {
            finish(layer_norm(&norm, 1e-12, leaf(&x_h), Some(leaf(&x_i_h))))
        });
        out.push(("residual add + layer norm [16,64,384]".into(), 12, ln_res));
        let ln = time_ms(iters, || finish(layer_norm(&norm, 1e-12, leaf(&x_h), None)));
        out.push(("layer norm [16,64,384]".into(), 1, ln));

        let mask_ids = Tensor::<2, burn::tensor::Int>::ones([b, s], &device);
        let (q0, k0, v0) = (rnd([b, s, h]), rnd([b, s, h]), rnd([b, s, h]));
        let attn = time_ms(iters, || {
            let q = split_heads(leaf(&q0), heads);
            let k = split_heads(leaf(&k0), heads);
            let v = split_heads(leaf(&v0), heads);
            let mask = padding_mask(&mask_ids, heads, s);
            finish(merge_heads(sdpa(q, k, v, Some(mask), false, None)))
        });
        out.push((
            "attention: split heads + sdpa + merge [16,12,64,32]".into(),
            6,
            attn,
        ));

        for (name, count, t) in out {
            if autodiff {
                if let Some(r) = rows
                    .iter_mut()
                    .find(|r: &&mut (String, usize, f64, f64)| r.0 == name)
                {
                    r.3 = t;
                }
            } else {
                rows.push((name, count, t, f64::NAN));
            }
        }
    }
    rows
}

pub(crate) fn run_profile(s: &Settings) -> Res<()> {
    let iters = s.infer_iters.max(5);
    eprintln!(
        "op-level profile at all-MiniLM-L6-v2 shapes, batch 16 x 64, {iters} iterations each"
    );
    let ours = profile_ops(iters);
    let torch: Option<Value> = peer_setup().and_then(|p| {
        let out = Command::new(&p.python)
            .arg(repo_root().join("benches/profile_ops.py"))
            .args(["--threads", "2", "--iters", &iters.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    });
    if torch.is_none() {
        eprintln!("NOTE: no PyTorch numbers (benches/profile_ops.py did not run)");
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| op (per forward) | count | burn fwd ms | torch fwd ms | burn fwd+bwd ms | torch fwd+bwd ms | burn step share ms (count x fwd+bwd) | torch step share ms |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut json_rows = Vec::new();
    let (mut sum_ours, mut sum_torch) = (0.0, 0.0);
    for (name, count, fwd, both) in &ours {
        let t = torch.as_ref().and_then(|t| t.get(name.as_str()));
        let tf = t.and_then(|t| f(t, &["fwd"]));
        let tb = t.and_then(|t| f(t, &["fwd_bwd"]));
        // LoRA rows count only what the adapter adds.
        let base = if name.contains("LoRA") {
            ours.iter()
                .find(|r| r.0.starts_with("linear 384->384 ("))
                .map(|r| r.3)
        } else {
            Some(0.0)
        };
        let tbase = if name.contains("LoRA") {
            torch
                .as_ref()
                .and_then(|t| f(t, &["linear 384->384 (q,k,v,attn-out)", "fwd_bwd"]))
        } else {
            Some(0.0)
        };
        let share = base.map(|b0| *count as f64 * (both - b0));
        let tshare = tb.zip(tbase).map(|(x, b0)| *count as f64 * (x - b0));
        sum_ours += share.unwrap_or(0.0);
        sum_torch += tshare.unwrap_or(0.0);
        let _ = writeln!(
            md,
            "| {name} | {count} | {} | {} | {} | {} | {} | {} |",
            fmt_opt(Some(*fwd), 2),
            fmt_opt(tf, 2),
            fmt_opt(Some(*both), 2),
            fmt_opt(tb, 2),
            fmt_opt(share, 0),
            fmt_opt(tshare, 0),
        );
        json_rows.push(json!({
            "op": name, "count": count, "fwd_ms": fwd, "fwd_bwd_ms": both,
            "torch_fwd_ms": tf, "torch_fwd_bwd_ms": tb, "step_share_ms": share, "torch_step_share_ms": tshare,
        }));
    }
    let _ = writeln!(
        md,
        "| **sum** | | | | | | **{sum_ours:.0}** | **{:.0}** |",
        sum_torch
    );
    println!("{md}");
    let out_dir = std::env::var("BENCH_OUT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("benches/results"));
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("step_profile.md"), &md)?;
    std::fs::write(
        out_dir.join("step_profile.json"),
        serde_json::to_string_pretty(&json!({ "rows": json_rows, "torch": torch }))? + "\n",
    )?;
    eprintln!("wrote {}/step_profile.{{md,json}}", out_dir.display());
    Ok(())
}
