//! Measuring one row in its own process: training steps, evaluation, adapter size, inference
//! latency, hot swap and cold load.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsAccumulator;
use burn::tensor::{Device, Tensor, TensorData};
use burn_peft::core::bundle::encode_safetensors;
use burn_peft::models::{HfModel, ModelInputs, Task, from_pretrained};
use burn_peft::prelude::*;
use burn_peft::train::data::{Collated, Example, collate, epoch_order};
use burn_peft::train::evaluate;
use burn_peft::train::optim::{AdamW, AdamWSettings, trainable_paths};
use burn_peft::train::schedule::{Schedule, lr_at};
use burn_peft::train::step::{accumulate_gradients, forward_loss, gradient_scale, model_inputs};
use serde_json::{Value, json};

use crate::rows::{
    Data, Method, ModelKind, Row, Subject, build_subject, llama_data, load_model, minilm_data,
};
use crate::{BATCH, MINILM, Res, SEQ, Settings};

// ------------------------------------------------------------------------------------------------
// Measuring helpers

/// `VmHWM` (peak resident set) of this process, in MiB.
pub(crate) fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

pub(crate) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub(crate) fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Every float parameter (optionally only those in `ids`) as `path -> data`.
pub(crate) struct CollectTensors<'a> {
    pub(crate) path: Vec<String>,
    pub(crate) ids: Option<&'a HashSet<ParamId>>,
    pub(crate) out: BTreeMap<String, TensorData>,
}

impl ModuleVisitor for CollectTensors<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.ids.is_none_or(|ids| ids.contains(&param.id)) {
            let mut key = self.path.join(".");
            while self.out.contains_key(&key) {
                key.push('_');
            }
            self.out.insert(key, param.val().into_data());
        }
    }
}

/// Size of a safetensors file holding the given tensors of `model`.
pub(crate) fn safetensors_size<M: Module>(
    model: &M,
    ids: Option<&HashSet<ParamId>>,
    dir: &Path,
) -> Res<u64> {
    let mut c = CollectTensors {
        path: Vec::new(),
        ids,
        out: BTreeMap::new(),
    };
    model.visit(&mut c);
    let bytes = encode_safetensors(&c.out)?;
    let file = dir.join("model.safetensors");
    std::fs::write(&file, &bytes)?;
    Ok(std::fs::metadata(&file)?.len())
}

// ------------------------------------------------------------------------------------------------
// One training step: the code path of `Trainer::train` (grad_accum 1, one device).

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StepTimes {
    pub(crate) total: f64,
    pub(crate) forward: f64,
    pub(crate) backward: f64,
    pub(crate) grad_norm: f64,
    pub(crate) optimizer: f64,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn train_step(
    subject: &mut Subject,
    optim: &mut AdamW,
    trainable: &[(ParamId, String, usize)],
    refs: &[&Example],
    data: &Data,
    lr: f64,
    seed: u64,
    device: &Device,
) -> (f64, StepTimes) {
    let t0 = Instant::now();
    device.seed(seed);
    let batch = collate(refs, data.pad_id, device);
    let model = subject.model();
    // The trainer's step (`peft_train::step`), not a copy: forward + loss, backward, clip.
    let loss = forward_loss(model, data.objective, &batch)
        .expect("the benchmark pairs each model with its inputs and objective");
    let value = loss.clone().into_scalar::<f64>();
    let forward = ms(t0);
    let t1 = Instant::now();
    let mut accumulator = GradientsAccumulator::<HfModel>::new();
    accumulate_gradients(loss, model, &mut accumulator);
    let grads = accumulator.grads();
    let backward = ms(t1);
    let t2 = Instant::now();
    let (_, scale) = gradient_scale(&grads, trainable, 1, Some(1.0));
    let grad_norm = ms(t2);
    let t3 = Instant::now();
    subject.update(|m| optim.step(lr, m, grads, scale));
    let _ = device.sync();
    let optimizer = ms(t3);
    (
        value,
        StepTimes {
            total: ms(t0),
            forward,
            backward,
            grad_norm,
            optimizer,
        },
    )
}

// ------------------------------------------------------------------------------------------------
// Inference latency (no autodiff)

pub(crate) fn time_forward(model: &HfModel, batch: &Collated, iters: usize) -> f64 {
    let run = || {
        let out = model
            .forward(&model_inputs(batch))
            .expect("the benchmark's own inputs fit the model");
        let t = out
            .class_logits
            .map(|t| t.into_data())
            .or_else(|| out.logits.map(|t| t.into_data()));
        std::hint::black_box(t);
    };
    for _ in 0..3 {
        run();
    }
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        run();
        v.push(ms(t));
    }
    median(&v)
}

// ------------------------------------------------------------------------------------------------
// A row, in its own process

pub(crate) fn run_row(row: Row, s: &Settings) -> Res<Value> {
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let device = Device::flex().autodiff();
    device.seed(42);
    let started = Instant::now();
    let data = match row.model {
        ModelKind::MiniLm => minilm_data()?,
        ModelKind::Llama => llama_data(128),
    };
    let model = load_model(row.model, data.num_labels, &device)?;
    let mut subject = build_subject(row, model)?;
    let (trainable_params, all_params) = subject.counts();
    let ids = subject.trainable_ids();
    let trainable = trainable_paths(subject.model(), &ids);
    let setup_ms = ms(started);
    eprintln!(
        "[{}] trainable params {trainable_params} of {all_params}; setup {setup_ms:.0} ms",
        row.id()
    );

    // Train for the budget; every step is timed, the median counts full 16 x 64 batches after
    // warm-up.
    let mut optim = AdamW::new(AdamWSettings::default());
    let warmup_lr = (0.06 * s.steps as f64).round() as usize;
    let mut times: Vec<StepTimes> = Vec::new();
    let mut losses = Vec::new();
    let mut timing_batch: Option<Vec<usize>> = None;
    let mut epoch = 0;
    let mut step = 0usize;
    'outer: loop {
        let order = epoch_order(data.train.len(), 42, epoch);
        for chunk in order.chunks(BATCH) {
            if chunk.len() < BATCH {
                continue;
            }
            let refs: Vec<&Example> = chunk.iter().map(|&i| &data.train[i]).collect();
            let full = refs.iter().any(|e| e.input_ids.len() == SEQ);
            let lr = lr_at(Schedule::Linear, row.lr(), step, s.steps, warmup_lr);
            let (loss, t) = train_step(
                &mut subject,
                &mut optim,
                &trainable,
                &refs,
                &data,
                lr,
                42u64.wrapping_mul(1_000_003).wrapping_add(step as u64 * 64),
                &device,
            );
            if !loss.is_finite() {
                return Err(format!("non-finite loss at step {step}").into());
            }
            losses.push(loss);
            if full && step >= s.warmup {
                times.push(t);
                timing_batch.get_or_insert_with(|| chunk.to_vec());
            }
            step += 1;
            if step.is_multiple_of(10) {
                eprintln!(
                    "[{}] step {step}/{}: loss {loss:.4}, {:.0} ms",
                    row.id(),
                    s.steps,
                    t.total
                );
            }
            if step >= s.steps {
                break 'outer;
            }
        }
        epoch += 1;
    }
    let train_peak_rss = peak_rss_mb();
    let pick = |f: fn(&StepTimes) -> f64| median(&times.iter().map(f).collect::<Vec<_>>());
    let step_ms = pick(|t| t.total);
    let breakdown = json!({
        "forward_ms": pick(|t| t.forward),
        "backward_ms": pick(|t| t.backward),
        "grad_norm_ms": pick(|t| t.grad_norm),
        "optimizer_ms": pick(|t| t.optimizer),
    });
    eprintln!(
        "[{}] train step median {step_ms:.1} ms over {} steps; {breakdown}; peak RSS {train_peak_rss:.0} MB",
        row.id(),
        times.len()
    );

    // Adapter size on disk.
    let tmp = tempfile::tempdir()?;
    let bundle = tmp.path().join("adapter");
    let adapter_bytes = match &subject {
        Subject::Peft(p) if row.method != Method::Full => {
            p.save_adapter(&bundle, "default")?;
            dir_size(&bundle)
        }
        Subject::Peft(p) => {
            std::fs::create_dir_all(&bundle)?;
            safetensors_size(p.model(), None, &bundle)?
        }
        Subject::Burn { model, ids, .. } => {
            std::fs::create_dir_all(&bundle)?;
            safetensors_size(model, Some(ids), &bundle)?
        }
    };

    // Evaluation after the budget (the code of `Trainer::evaluate`).
    let eval_started = Instant::now();
    let report = evaluate(
        subject.model(),
        &data.eval,
        data.objective,
        data.pad_id,
        32,
        &device,
    )?;
    let eval_ms = ms(eval_started);
    eprintln!(
        "[{}] eval after {} steps: loss {:.4} accuracy {:?} perplexity {:?} ({eval_ms:.0} ms)",
        row.id(),
        s.steps,
        report.loss,
        report.accuracy,
        report.perplexity
    );

    // Inference latency on the plain CPU device, batch 16 x 64.
    let infer_device = Device::flex();
    let batch_idx = timing_batch.unwrap_or_else(|| (0..BATCH).collect());
    let refs: Vec<&Example> = batch_idx.iter().map(|&i| &data.train[i]).collect();
    let batch = collate(&refs, data.pad_id, &infer_device);
    let base = load_model(row.model, data.num_labels, &infer_device)?;
    let base_ms = time_forward(&base, &batch, s.infer_iters);
    let mut unmerged_ms = None;
    let mut merged_ms = None;
    let mut hot_swap = Value::Null;
    match row.method {
        Method::Lora | Method::LoraNoDropout | Method::LoraAllLinear | Method::Prefix => {
            let mut peft = PeftModel::new(base);
            peft.load_adapter(&bundle, "default")?;
            unmerged_ms = Some(time_forward(peft.model(), &batch, s.infer_iters));
            if row.method == Method::Prefix {
                drop(peft);
            } else {
                if row.method == Method::Lora {
                    hot_swap = measure_hot_swap(&mut peft, &bundle)?;
                }
                let merged = peft.merge_and_unload()?;
                merged_ms = Some(time_forward(&merged, &batch, s.infer_iters));
            }
        }
        Method::Full => {}
        Method::BurnLora => {
            drop(base);
            let unmerged = subject.model().valid();
            unmerged_ms = Some(time_forward(&unmerged, &batch, s.infer_iters));
            let merged = unmerged.materialize();
            merged_ms = Some(time_forward(&merged, &batch, s.infer_iters));
        }
    }
    let total_peak_rss = peak_rss_mb();

    Ok(json!({
        "id": row.id(),
        "model": row.model_name(),
        "method": row.method_name(),
        "label": row.label(),
        "trainable_params": trainable_params,
        "all_params": all_params,
        "train_steps": s.steps,
        "timed_steps": times.len(),
        "learning_rate": row.lr(),
        "train_step_ms_median": step_ms,
        "train_step_ms_all": times.iter().map(|t| (t.total * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        "train_step_breakdown_ms": breakdown,
        "final_train_loss": losses.last().copied(),
        "peak_rss_mb": train_peak_rss,
        "peak_rss_mb_incl_inference": total_peak_rss,
        "adapter_bytes": adapter_bytes,
        "eval": {
            "loss": report.loss,
            "accuracy": report.accuracy,
            "macro_f1": report.macro_f1,
            "perplexity": report.perplexity,
            "examples": data.eval.len(),
        },
        "infer_ms": { "base": base_ms, "unmerged": unmerged_ms, "merged": merged_ms },
        "hot_swap": hot_swap,
        "load_average_at_start": load_average.trim(),
    }))
}

/// Hot swap on the inference model: load a second adapter from disk and activate it, then switch
/// between the two loaded adapters.
pub(crate) fn measure_hot_swap(peft: &mut PeftModel<HfModel>, bundle: &Path) -> Res<Value> {
    let mut loads = Vec::new();
    for i in 0..5 {
        let name = format!("swap{i}");
        let t = Instant::now();
        peft.load_adapter(bundle, &name)?;
        peft.set_adapter(&name)?;
        loads.push(ms(t));
    }
    let mut switches = Vec::new();
    for i in 0..50 {
        let name = if i % 2 == 0 { "default" } else { "swap0" };
        let t = Instant::now();
        peft.set_adapter(name)?;
        switches.push(ms(t));
    }
    for i in 0..5 {
        peft.delete_adapter(&format!("swap{i}"))?;
    }
    peft.set_adapter("default")?;
    Ok(json!({
        "load_and_activate_ms_median": median(&loads),
        "switch_ms_median": median(&switches),
    }))
}

/// Cold load of all-MiniLM-L6-v2 to the first forward: config + weights + tokenizer, tokenize 5
/// sentences, forward, read the embeddings back. Timed from `main`'s start.
pub(crate) fn cold_load(main_started: Instant) -> Res<Value> {
    let device = Device::flex();
    let loaded = from_pretrained(MINILM, Task::Encoder, &device)?;
    let load_ms = ms(main_started);
    let tokenizer = loaded.tokenizer.as_ref().ok_or("no tokenizer.json")?;
    let texts = [
        "simple, fast and elegant image viewer",
        "Samyak TrueType font for Malayalam language",
        "King James Version with Strongs Numbers for SWORD",
        "command-line tool to convert between image formats",
        "Python bindings for the GTK toolkit",
    ];
    let b = tokenizer.batch(&texts, 128, &device)?;
    let out = loaded.model.forward(&ModelInputs {
        input_ids: b.input_ids,
        attention_mask: Some(b.attention_mask),
        token_type_ids: Some(b.token_type_ids),
        pixel_values: None,
    })?;
    let emb = out.sentence_embedding.ok_or("no embedding")?.into_data();
    std::hint::black_box(emb);
    Ok(json!({ "load_ms": load_ms, "first_forward_total_ms": ms(main_started) }))
}
