//! Rendering the results: markdown tables and the SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use burn_peft::core::thousands;
use serde_json::Value;

use crate::Res;

pub(crate) fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

pub(crate) fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

pub(crate) fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "–".into())
}

pub(crate) fn bytes_h(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else {
        format!("{:.0} kB", n / 1e3)
    }
}

/// The markdown tables.
pub(crate) fn render_markdown(results: &[Value], cold: &Value, meta: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Batch 16 x seq 64, {} thread(s) (`RAYON_NUM_THREADS` / `torch.set_num_threads`), release profile; \
         train step = forward + backward + optimizer step (AdamW), median over {} timed steps \
         after {} warm-up; eval after {} steps. Machine: {} (load average at the end: {}).\n",
        meta["threads"].as_str().unwrap_or("2"),
        meta["timed_steps_note"].as_str().unwrap_or("?"),
        meta["warmup_steps"],
        meta["train_steps"],
        meta["machine"].as_str().unwrap_or("?"),
        meta["load_average"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(md, "### Training\n");
    let _ = writeln!(
        md,
        "| model | method | trainable params | step ms (burn-peft) | step ms (PyTorch+PEFT) | vs PyTorch | vs Burn apply_lora | peak RSS MB (burn-peft / PyTorch) | RSS vs full FT | adapter on disk | eval after budget |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in results {
        let ours = &r["ours"];
        let peer = &r["peer"];
        let model = r["model"].as_str().unwrap_or("?");
        let burn = results
            .iter()
            .find(|x| x["model"] == r["model"] && x["method"] == "burn-apply-lora");
        let full = results
            .iter()
            .find(|x| x["model"] == r["model"] && x["method"] == "full");
        let step = f(ours, &["train_step_ms_median"]);
        let peer_step = f(peer, &["train_step_ms_median"]);
        let burn_step = burn.and_then(|b| f(&b["ours"], &["train_step_ms_median"]));
        let rss = f(ours, &["peak_rss_mb"]);
        let full_rss = full.and_then(|b| f(&b["ours"], &["peak_rss_mb"]));
        let eval = if let Some(a) = f(ours, &["eval", "accuracy"]) {
            format!("acc {:.3}", a)
        } else if let Some(p) = f(ours, &["eval", "perplexity"]) {
            format!("ppl {:.2}", p)
        } else {
            "–".into()
        };
        let is_burn = r["method"] == "burn-apply-lora";
        let is_full = r["method"] == "full";
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            if model == "minilm" {
                "all-MiniLM-L6-v2"
            } else {
                "tiny Llama (GQA)"
            },
            r["label"].as_str().unwrap_or("?"),
            ours["trainable_params"]
                .as_u64()
                .map(|n| thousands(n as usize))
                .unwrap_or("–".into()),
            fmt_opt(step, 1),
            fmt_opt(peer_step, 1),
            fmt_ratio(ratio(step, peer_step)),
            if is_burn {
                "1.00x".into()
            } else if r["method"] == "lora" || r["method"] == "lora-nodrop" {
                fmt_ratio(ratio(step, burn_step))
            } else {
                "–".into()
            },
            fmt_opt(rss, 0),
            fmt_opt(f(peer, &["peak_rss_mb"]), 0),
            if is_full {
                "1.00x".into()
            } else {
                fmt_ratio(ratio(rss, full_rss))
            },
            f(ours, &["adapter_bytes"])
                .map(bytes_h)
                .unwrap_or("–".into()),
            eval,
        );
    }
    let _ = writeln!(
        md,
        "\n### Inference (forward, batch 16 x 64, no autodiff)\n"
    );
    let _ = writeln!(
        md,
        "| model | method | base ms | unmerged ms | merged ms | unmerged / base | merged / base | PyTorch base / unmerged / merged ms |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in results {
        let ours = &r["ours"];
        let peer = &r["peer"];
        let base = f(ours, &["infer_ms", "base"]);
        let un = f(ours, &["infer_ms", "unmerged"]);
        let me = f(ours, &["infer_ms", "merged"]);
        let model = r["model"].as_str().unwrap_or("?");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
            if model == "minilm" {
                "all-MiniLM-L6-v2"
            } else {
                "tiny Llama (GQA)"
            },
            r["label"].as_str().unwrap_or("?"),
            fmt_opt(base, 2),
            fmt_opt(un, 2),
            fmt_opt(me, 2),
            fmt_ratio(ratio(un, base)),
            fmt_ratio(ratio(me, base)),
            fmt_opt(f(peer, &["infer_ms", "base"]), 2),
            fmt_opt(f(peer, &["infer_ms", "unmerged"]), 2),
            fmt_opt(f(peer, &["infer_ms", "merged"]), 2),
        );
    }
    let _ = writeln!(md, "\n### Other\n");
    if let Some(h) = results
        .iter()
        .find(|r| r["id"] == "minilm/lora")
        .map(|r| &r["ours"]["hot_swap"])
        .filter(|h| !h.is_null())
    {
        let _ = writeln!(
            md,
            "- Hot swap (all-MiniLM-L6-v2, LoRA r8 q/v bundle): `load_adapter` + `set_adapter` {} ms (median of 5); \
             `set_adapter` between two loaded adapters {} ms (median of 50).",
            fmt_opt(f(h, &["load_and_activate_ms_median"]), 2),
            fmt_opt(f(h, &["switch_ms_median"]), 4),
        );
    }
    if !cold.is_null() {
        let _ = writeln!(
            md,
            "- Cold load of all-MiniLM-L6-v2 to first forward (fresh process; config + safetensors + tokenizer, 5 sentences, embeddings read back): \
             {} ms in-process from `main` (weights loaded at {} ms), {} ms process wall incl. exec (medians of {}).",
            fmt_opt(f(cold, &["first_forward_total_ms"]), 0),
            fmt_opt(f(cold, &["load_ms"]), 0),
            fmt_opt(f(cold, &["process_wall_ms"]), 0),
            cold["runs"],
        );
    }
    md
}

/// Grouped bars, burn-peft vs PyTorch + PEFT, one panel per model: train step time (top) and
/// peak RSS (bottom).
pub(crate) fn render_svg(results: &[Value], path: &Path) -> Res<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.draw(&Text::new(
        "burn-peft vs PyTorch + PEFT: batch 16 x 64, 2 threads (lower is better)",
        (20, 12),
        ("sans-serif", 20).into_font(),
    ))?;
    let panels = body.split_evenly((2, 2));
    let metrics = [
        ("train step (ms)", "train_step_ms_median"),
        ("peak RSS (MB)", "peak_rss_mb"),
    ];
    let models = [
        ("minilm", "all-MiniLM-L6-v2"),
        ("llama", "tiny Llama (GQA)"),
    ];
    let ours_color = RGBColor(0xd9, 0x5f, 0x02);
    let peer_color = RGBColor(0x1b, 0x9e, 0x77);
    for (i, panel) in panels.iter().enumerate() {
        let (metric_name, key) = metrics[i / 2];
        let (model, name) = models[i % 2];
        let rows: Vec<&Value> = results.iter().filter(|r| r["model"] == model).collect();
        if rows.is_empty() {
            continue;
        }
        let vals: Vec<(String, Option<f64>, Option<f64>)> = rows
            .iter()
            .map(|r| {
                (
                    r["method"].as_str().unwrap_or("?").to_string(),
                    f(&r["ours"], &[key]).filter(|v| v.is_finite()),
                    f(&r["peer"], &[key]).filter(|v| v.is_finite()),
                )
            })
            .collect();
        let max = vals
            .iter()
            .flat_map(|(_, a, b)| [*a, *b])
            .flatten()
            .fold(1.0f64, f64::max)
            * 1.25;
        let n = vals.len();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name}: {metric_name}"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..n as f64, 0f64..max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (i, (method, ours, peer)) in vals.iter().enumerate() {
            let x = i as f64;
            for (v, x0, x1, color) in [
                (ours, x + 0.1, x + 0.48, ours_color),
                (peer, x + 0.52, x + 0.9, peer_color),
            ] {
                if let Some(v) = v {
                    chart.draw_series(std::iter::once(Rectangle::new(
                        [(x0, 0.0), (x1, *v)],
                        color.filled(),
                    )))?;
                    chart.draw_series(std::iter::once(Text::new(
                        format!("{v:.0}"),
                        (x0, *v + max * 0.01),
                        ("sans-serif", 10).into_font(),
                    )))?;
                }
            }
            chart.draw_series(std::iter::once(Text::new(
                method.clone(),
                (x + 0.08, -max * 0.03),
                ("sans-serif", 12).into_font(),
            )))?;
        }
        for (label, color) in [("burn-peft", ours_color), ("PyTorch + PEFT", peer_color)] {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, 0.0), (0.0, 0.0)],
                    color.filled(),
                )))?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
