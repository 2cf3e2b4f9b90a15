//! Method comparison: LoRA, LoRA on all linear layers, prefix tuning, full fine-tuning and Burn's
//! built-in `Module::apply_lora`, on the real all-MiniLM-L6-v2 (sequence classification, the
//! shipped Debian-sections data) and on a tiny Llama (causal LM, synthetic token sequences), side
//! by side with PyTorch + Hugging Face PEFT (`benches/peer/peft_cpu.py`).
//!
//! `cargo bench --bench method_comparison`. Every row runs in its own child process (this binary
//! re-invoked with `--row ID`), so each peak RSS (`VmHWM`) is the row's own. Writes
//! `benches/results/method_comparison.{json,md,svg}`. Environment variables: see
//! `benches/README.md`.
//!
//! Layout: `rows` (what is compared), `measure` (one row, in its own process), `peer` (the
//! PyTorch + PEFT peer), `report` (markdown and SVG), `profile` (`--profile`); this file holds
//! the settings and the orchestrator.

use std::error::Error;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{Value, json};

use measure::{cold_load, median, ms, run_row};
use peer::{peer_setup, run_peer};
use profile::run_profile;
use report::{f, fmt_opt, fmt_ratio, ratio, render_markdown, render_svg};
use rows::{ModelKind, all_rows, selected_rows};

mod measure;
mod peer;
mod profile;
mod report;
mod rows;

type Res<T> = Result<T, Box<dyn Error>>;

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";
const LLAMA_DIR: &str = "tests/fixtures/models/llama_gqa";
const BATCH: usize = 16;
const SEQ: usize = 64;
const ROW_MARKER: &str = "BENCH_ROW_JSON ";

// ------------------------------------------------------------------------------------------------
// Settings

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Knobs, all from the environment (documented in benches/README.md).
#[derive(Debug, Clone)]
struct Settings {
    /// `BENCH_TRAIN_STEPS`: optimizer steps per row (the eval budget; every step is timed).
    steps: usize,
    /// `BENCH_WARMUP_STEPS`: first steps left out of the median.
    warmup: usize,
    /// `BENCH_INFER_ITERS`: timed forwards per inference variant (after 3 warm-up forwards).
    infer_iters: usize,
    /// `BENCH_COLD_RUNS`: fresh processes for the cold-load measurement.
    cold_runs: usize,
    /// `BENCH_PEER_ITERS`: timed steps / forwards of the PyTorch peer.
    peer_iters: usize,
}

impl Settings {
    fn from_env() -> Self {
        Self {
            steps: env_usize("BENCH_TRAIN_STEPS", 60).max(1),
            warmup: env_usize("BENCH_WARMUP_STEPS", 3),
            infer_iters: env_usize("BENCH_INFER_ITERS", 20).max(1),
            cold_runs: env_usize("BENCH_COLD_RUNS", 3).max(1),
            peer_iters: env_usize("BENCH_PEER_ITERS", 10).max(1),
        }
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------------------
// The orchestrator

fn child(args: &[&str]) -> Res<Value> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        cmd.env("RAYON_NUM_THREADS", "2");
    }
    if std::env::var_os("HF_HUB_OFFLINE").is_none() {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    let started = Instant::now();
    let out = cmd.output()?;
    let wall = ms(started);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(ROW_MARKER))
        .ok_or_else(|| format!("child {args:?} failed ({}) without a result", out.status))?;
    let mut v: Value = serde_json::from_str(line)?;
    if let Some(m) = v.as_object_mut() {
        m.insert("process_wall_ms".into(), json!(wall));
    }
    Ok(v)
}

fn orchestrate(s: &Settings) -> Res<()> {
    let rows = selected_rows();
    let out_dir = std::env::var("BENCH_OUT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("benches/results"));
    std::fs::create_dir_all(&out_dir)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "2".into());
    eprintln!(
        "method comparison: {} row(s), {} steps each, RAYON_NUM_THREADS={threads}",
        rows.len(),
        s.steps
    );
    let peer = peer_setup();
    if peer.is_none() {
        eprintln!(
            "NOTE: the PyTorch + PEFT peer is disabled or benches/peer/peft_cpu.py is missing; \
             writing burn-peft results only."
        );
    }
    let mut results = Vec::new();
    for row in &rows {
        eprintln!("== {} ==", row.id());
        let ours = match child(&["--row", &row.id()]) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("[{}] FAILED: {e}", row.id());
                json!({ "error": e.to_string() })
            }
        };
        let peer_v = match (&peer, row.peer_method()) {
            (Some(p), Some(_)) => {
                let labels = if row.model == ModelKind::MiniLm { 8 } else { 0 };
                match run_peer(p, *row, labels, s) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("NOTE: PyTorch peer unavailable for {}: {e}", row.id());
                        json!({ "error": e })
                    }
                }
            }
            _ => Value::Null,
        };
        let step = f(&ours, &["train_step_ms_median"]);
        let peer_step = f(&peer_v, &["train_step_ms_median"]);
        eprintln!(
            "[{}] step {} ms (burn-peft) vs {} ms (PyTorch+PEFT): {}",
            row.id(),
            fmt_opt(step, 1),
            fmt_opt(peer_step, 1),
            fmt_ratio(ratio(step, peer_step))
        );
        results.push(json!({
            "id": row.id(),
            "model": row.model_name(),
            "method": row.method_name(),
            "label": row.label(),
            "ours": ours,
            "peer": peer_v,
        }));
    }
    let cold = if rows.iter().any(|r| r.model == ModelKind::MiniLm) {
        let mut runs = Vec::new();
        for _ in 0..s.cold_runs {
            match child(&["--cold-load"]) {
                Ok(v) => runs.push(v),
                Err(e) => eprintln!("cold load failed: {e}"),
            }
        }
        let m = |k: &str| median(&runs.iter().filter_map(|v| f(v, &[k])).collect::<Vec<_>>());
        if runs.is_empty() {
            Value::Null
        } else {
            json!({
                "runs": runs.len(),
                "load_ms": m("load_ms"),
                "first_forward_total_ms": m("first_forward_total_ms"),
                "process_wall_ms": m("process_wall_ms"),
                "all": runs,
            })
        }
    } else {
        Value::Null
    };
    let timed: Vec<String> = results
        .iter()
        .filter_map(|r| r["ours"]["timed_steps"].as_u64())
        .map(|n| n.to_string())
        .collect();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    let mut timed_dedup = timed.clone();
    timed_dedup.sort();
    timed_dedup.dedup();
    let timed_note = if timed_dedup.is_empty() {
        "?".to_string()
    } else {
        timed_dedup.join("/")
    };
    let meta = json!({
        "batch": BATCH,
        "seq": SEQ,
        "threads": threads,
        "train_steps": s.steps,
        "warmup_steps": s.warmup,
        "infer_iters": s.infer_iters,
        "peer_iters": s.peer_iters,
        "timed_steps_note": timed_note,
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string(),
        "machine": format!("{cpu}, {} CPU(s) visible", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)),
    });
    let doc = json!({ "meta": meta, "rows": results, "cold_load": cold });
    std::fs::write(
        out_dir.join("method_comparison.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )?;
    let md = render_markdown(&results, &cold, &meta);
    std::fs::write(out_dir.join("method_comparison.md"), &md)?;
    if let Err(e) = render_svg(&results, &out_dir.join("method_comparison.svg")) {
        eprintln!("chart failed: {e}");
    }
    println!("{md}");
    println!(
        "wrote {}/method_comparison.{{json,md,svg}}",
        out_dir.display()
    );
    Ok(())
}

fn main() -> Res<()> {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().collect();
    let s = Settings::from_env();
    if let Some(i) = args.iter().position(|a| a == "--row") {
        let id = args.get(i + 1).ok_or("--row needs an id")?;
        let row = all_rows()
            .into_iter()
            .find(|r| r.id() == *id)
            .ok_or_else(|| format!("unknown row `{id}`"))?;
        let v = run_row(row, &s)?;
        println!("{ROW_MARKER}{v}");
        return Ok(());
    }
    if args.iter().any(|a| a == "--profile") {
        return run_profile(&s);
    }
    if args.iter().any(|a| a == "--cold-load") {
        let v = cold_load(started)?;
        println!("{ROW_MARKER}{v}");
        return Ok(());
    }
    // `cargo bench` passes `--bench`. A Criterion-style filter meant for another bench
    // (`cargo bench -- hot_swap`) skips this one; rows are chosen with BENCH_ROWS.
    if let Some(filter) = args.iter().skip(1).find(|a| !a.starts_with('-'))
        && !"method_comparison".contains(filter.as_str())
    {
        eprintln!(
            "method_comparison: skipped (filter `{filter}`; rows are chosen with BENCH_ROWS)"
        );
        return Ok(());
    }
    orchestrate(&s)
}
