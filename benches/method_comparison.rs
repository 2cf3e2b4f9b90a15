//! Method comparison: LoRA, LoRA on all linear layers, prefix tuning, full fine-tuning and Burn's
//! built-in `Module::apply_lora`, on the real all-MiniLM-L6-v2 (sequence classification, the
//! shipped Debian-sections data) and on a tiny Llama (causal LM, synthetic token sequences), side
//! by side with PyTorch + Hugging Face PEFT (`benches/peer/peft_cpu.py`).
//!
//! `cargo bench --bench method_comparison`. Every row runs in its own child process (this binary
//! re-invoked with `--row ID`), so each peak RSS (`VmHWM`) is the row's own. Writes
//! `benches/results/method_comparison.{json,md,svg}`. Environment variables: see
//! `benches/README.md`.

use std::collections::{BTreeMap, HashSet};
use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use burn::module::{Lora, Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use burn_peft::core::bundle::encode_safetensors;
use burn_peft::models::{HfModel, HfTokenizer, ModelInputs, Task, from_pretrained, model_dir};
use burn_peft::prelude::*;
use burn_peft::train::data::{
    Collated, DataConfig, Example, TaskKind, collate, epoch_order, load_examples,
};
use burn_peft::train::optim::{AdamW, AdamWSettings, global_grad_norm, trainable_paths};
use burn_peft::train::schedule::{Schedule, lr_at};
use burn_peft::train::{Objective, evaluate, objective_loss};
use serde_json::{Value, json};

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
// Rows

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelKind {
    MiniLm,
    Llama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Lora,
    LoraNoDropout,
    LoraAllLinear,
    Prefix,
    Full,
    BurnLora,
}

#[derive(Debug, Clone, Copy)]
struct Row {
    model: ModelKind,
    method: Method,
}

impl Row {
    fn id(&self) -> String {
        format!("{}/{}", self.model_name(), self.method_name())
    }
    fn model_name(&self) -> &'static str {
        match self.model {
            ModelKind::MiniLm => "minilm",
            ModelKind::Llama => "llama",
        }
    }
    fn method_name(&self) -> &'static str {
        match self.method {
            Method::Lora => "lora",
            Method::LoraNoDropout => "lora-nodrop",
            Method::LoraAllLinear => "lora-all-linear",
            Method::Prefix => "prefix",
            Method::Full => "full",
            Method::BurnLora => "burn-apply-lora",
        }
    }
    fn label(&self) -> &'static str {
        match self.method {
            Method::Lora => "LoRA r8 (q,v)",
            Method::LoraNoDropout => "LoRA r8 (q,v), no dropout",
            Method::LoraAllLinear => "LoRA r8 all-linear",
            Method::Prefix => "prefix 16 tokens",
            Method::Full => "full fine-tuning",
            Method::BurnLora => "Burn apply_lora r8 (q,v)",
        }
    }
    /// Peak learning rate of the accuracy budget (usual values per method).
    fn lr(&self) -> f64 {
        match self.method {
            Method::Lora | Method::LoraNoDropout | Method::LoraAllLinear | Method::BurnLora => 1e-3,
            Method::Prefix => 1e-2,
            Method::Full => 1e-4,
        }
    }
    /// `--method` of the PyTorch peer, if it has this row.
    fn peer_method(&self) -> Option<&'static str> {
        match self.method {
            Method::BurnLora | Method::LoraNoDropout => None,
            _ => Some(self.method_name()),
        }
    }
}

fn all_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for model in [ModelKind::MiniLm, ModelKind::Llama] {
        for method in [
            Method::Lora,
            Method::LoraAllLinear,
            Method::Prefix,
            Method::Full,
            Method::BurnLora,
            Method::LoraNoDropout,
        ] {
            rows.push(Row { model, method });
        }
    }
    rows
}

fn selected_rows() -> Vec<Row> {
    let filter: Option<Vec<String>> = std::env::var("BENCH_ROWS").ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    all_rows()
        .into_iter()
        .filter(|r| {
            filter.as_ref().is_none_or(|f| {
                f.iter()
                    .any(|x| *x == r.id() || x == r.model_name() || x == r.method_name())
            })
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Measuring helpers

/// `VmHWM` (peak resident set) of this process, in MiB.
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn median(v: &[f64]) -> f64 {
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

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn dir_size(dir: &Path) -> u64 {
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
struct CollectTensors<'a> {
    path: Vec<String>,
    ids: Option<&'a HashSet<ParamId>>,
    out: BTreeMap<String, TensorData>,
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

/// Ids and element counts of the parameters that require gradients.
struct RequireGrad {
    ids: HashSet<ParamId>,
    trainable: usize,
    all: usize,
}

impl ModuleVisitor for RequireGrad {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.lazy_shape().num_elements();
        self.all += n;
        if param.val().is_require_grad() {
            self.ids.insert(param.id);
            self.trainable += n;
        }
    }
}

/// Size of a safetensors file holding the given tensors of `model`.
fn safetensors_size<M: Module>(model: &M, ids: Option<&HashSet<ParamId>>, dir: &Path) -> Res<u64> {
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
// Data

struct Data {
    train: Vec<Example>,
    eval: Vec<Example>,
    num_labels: usize,
    pad_id: i64,
    objective: Objective,
}

fn minilm_data() -> Res<Data> {
    let dir = model_dir(MINILM)?;
    let tokenizer = HfTokenizer::from_dir(&dir)?;
    let cfg = DataConfig {
        max_length: SEQ,
        ..Default::default()
    };
    let data = repo_root().join("examples/data");
    let (train, labels) = load_examples(
        &data.join("train.jsonl"),
        TaskKind::Classification,
        &cfg,
        &tokenizer,
        None,
    )?;
    let labels = labels.ok_or("no label map")?;
    let (eval, _) = load_examples(
        &data.join("eval.jsonl"),
        TaskKind::Classification,
        &cfg,
        &tokenizer,
        Some(&labels),
    )?;
    Ok(Data {
        train,
        eval,
        num_labels: labels.len(),
        pad_id: tokenizer.pad_id() as i64,
        objective: Objective::Classification {
            num_labels: labels.len(),
        },
    })
}

/// Synthetic causal-LM sequences for the tiny Llama: arithmetic progressions modulo the
/// vocabulary (`(a + b·t) mod V`, random `a`, `b`), a pattern the model can learn in context.
fn llama_data(vocab: usize) -> Data {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut make = |n: usize| -> Vec<Example> {
        (0..n)
            .map(|_| {
                let a = next() % vocab as u64;
                let b = 1 + next() % 7;
                let ids: Vec<i64> = (0..SEQ as u64)
                    .map(|t| ((a + b * t) % vocab as u64) as i64)
                    .collect();
                Example {
                    token_type_ids: vec![0; SEQ],
                    label: None,
                    labels: Some(ids.clone()),
                    input_ids: ids,
                    line: 0,
                }
            })
            .collect()
    };
    let train = make(2048);
    let eval = make(128);
    Data {
        train,
        eval,
        num_labels: 0,
        pad_id: 0,
        objective: Objective::CausalLm,
    }
}

fn inputs(batch: &Collated) -> ModelInputs {
    ModelInputs {
        input_ids: batch.input_ids.clone(),
        attention_mask: Some(batch.attention_mask.clone()),
        token_type_ids: Some(batch.token_type_ids.clone()),
    }
}

fn load_model(kind: ModelKind, num_labels: usize, device: &Device) -> Res<HfModel> {
    Ok(match kind {
        ModelKind::MiniLm => {
            from_pretrained(MINILM, Task::SequenceClassification { num_labels }, device)?.model
        }
        ModelKind::Llama => {
            from_pretrained(
                repo_root().join(LLAMA_DIR).to_str().ok_or("path")?,
                Task::CausalLm,
                device,
            )?
            .model
        }
    })
}

// ------------------------------------------------------------------------------------------------
// The model under training: a PeftModel, or a plain model with Burn's LoRA reparameterization.

enum Subject {
    Peft(PeftModel<HfModel>),
    Burn {
        model: HfModel,
        ids: HashSet<ParamId>,
        trainable: usize,
        all: usize,
    },
}

impl Subject {
    fn model(&self) -> &HfModel {
        match self {
            Subject::Peft(p) => p.model(),
            Subject::Burn { model, .. } => model,
        }
    }
    fn update(&mut self, f: impl FnOnce(HfModel) -> HfModel) {
        match self {
            Subject::Peft(p) => p.update(f),
            Subject::Burn { model, .. } => {
                let m = model.clone();
                *model = f(m);
            }
        }
    }
    fn trainable_ids(&self) -> HashSet<ParamId> {
        match self {
            Subject::Peft(p) => p.trainable_param_ids().clone(),
            Subject::Burn { ids, .. } => ids.clone(),
        }
    }
    fn counts(&self) -> (usize, usize) {
        match self {
            Subject::Peft(p) => {
                let r = p.trainable_report();
                (r.trainable, r.all)
            }
            Subject::Burn { trainable, all, .. } => (*trainable, *all),
        }
    }
}

fn build_subject(row: Row, model: HfModel) -> Res<Subject> {
    let cls = row.model == ModelKind::MiniLm;
    let save = cls.then(|| vec!["classifier".to_string()]);
    let task_type = Some(if cls { "SEQ_CLS" } else { "CAUSAL_LM" }.to_string());
    let qv: TargetModules = if cls {
        ["query", "value"].into()
    } else {
        ["q_proj", "v_proj"].into()
    };
    let lora = |targets: TargetModules, lora_dropout: f64| LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout,
        target_modules: Some(targets),
        modules_to_save: save.clone(),
        task_type: task_type.clone(),
        ..Default::default()
    };
    Ok(match row.method {
        Method::Lora | Method::LoraNoDropout | Method::LoraAllLinear | Method::Prefix => {
            let mut peft = PeftModel::new(model);
            // Dropout 0.1 as the PyTorch peer (benches/peer/peft_cpu.py); 0 for the row that
            // compares with Burn's LoRA, which has none.
            match row.method {
                Method::Lora => peft.add_adapter("default", &lora(qv, 0.1))?,
                Method::LoraNoDropout => peft.add_adapter("default", &lora(qv, 0.0))?,
                Method::LoraAllLinear => {
                    peft.add_adapter("default", &lora("all-linear".into(), 0.1))?
                }
                _ => peft.add_adapter(
                    "default",
                    &PrefixTuningConfig {
                        num_virtual_tokens: 16,
                        modules_to_save: save.clone(),
                        task_type: task_type.clone(),
                        ..Default::default()
                    },
                )?,
            };
            Subject::Peft(peft)
        }
        Method::Full => {
            let mut peft = PeftModel::new(model);
            peft.set_train_base(true);
            Subject::Peft(peft)
        }
        Method::BurnLora => {
            let group = ParamGroup::from_regex(r"(^|\.)(query|value|q_proj|v_proj)\.weight$")
                .map_err(|e| format!("{e:?}"))?;
            let mut model = model.apply_lora(Lora::new(8, 16.0).set_param_group(group));
            if cls {
                // PEFT trains the classifier of a SEQ_CLS model (modules_to_save); so does this row.
                model = model.unfreeze_group(ParamGroup::from_predicate("classifier"));
            }
            let mut v = RequireGrad {
                ids: HashSet::new(),
                trainable: 0,
                all: 0,
            };
            model.visit(&mut v);
            Subject::Burn {
                model,
                ids: v.ids,
                trainable: v.trainable,
                all: v.all,
            }
        }
    })
}

// ------------------------------------------------------------------------------------------------
// One training step: the code path of `Trainer::train` (grad_accum 1, one device).

#[derive(Debug, Clone, Copy, Default)]
struct StepTimes {
    total: f64,
    forward: f64,
    backward: f64,
    grad_norm: f64,
    optimizer: f64,
}

#[allow(clippy::too_many_arguments)]
fn train_step(
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
    let out = model
        .forward(&inputs(&batch))
        .expect("the benchmark's own inputs fit the model");
    // The trainer's loss function, not a copy.
    let (loss, _) = objective_loss(data.objective, &out, &batch)
        .expect("the benchmark pairs each model with its objective");
    let value = loss.clone().into_scalar::<f64>();
    let forward = ms(t0);
    let t1 = Instant::now();
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let mut accumulator = GradientsAccumulator::<HfModel>::new();
    accumulator.accumulate(model, grads);
    let grads = accumulator.grads();
    let backward = ms(t1);
    let t2 = Instant::now();
    let norm = global_grad_norm(&grads, trainable);
    let clip = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
    let grad_norm = ms(t2);
    let t3 = Instant::now();
    subject.update(|m| optim.step(lr, m, grads, clip));
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

fn time_forward(model: &HfModel, batch: &Collated, iters: usize) -> f64 {
    let run = || {
        let out = model
            .forward(&inputs(batch))
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

fn run_row(row: Row, s: &Settings) -> Res<Value> {
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
fn measure_hot_swap(peft: &mut PeftModel<HfModel>, bundle: &Path) -> Res<Value> {
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
fn cold_load(main_started: Instant) -> Res<Value> {
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
    })?;
    let emb = out.sentence_embedding.ok_or("no embedding")?.into_data();
    std::hint::black_box(emb);
    Ok(json!({ "load_ms": load_ms, "first_forward_total_ms": ms(main_started) }))
}

// ------------------------------------------------------------------------------------------------
// Op-level profile of a MiniLM step (`--profile`)

/// A one-layer model so `PeftModel` can inject LoRA into `proj`.
#[derive(Module, Debug, Adaptable)]
struct OneLinear {
    proj: Linear,
}

fn time_ms(iters: usize, mut f: impl FnMut()) -> f64 {
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
fn profile_ops(iters: usize) -> Vec<(String, usize, f64, f64)> {
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

fn run_profile(s: &Settings) -> Res<()> {
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

struct PeerSetup {
    python: String,
    python_prefix: String,
    script: PathBuf,
}

fn peer_setup() -> Option<PeerSetup> {
    if std::env::var("BENCH_NO_PEER").is_ok_and(|v| v != "0") {
        return None;
    }
    let script = repo_root().join("benches/peer/peft_cpu.py");
    if !script.is_file() {
        return None;
    }
    let python = std::env::var("PEFT_PEER_PYTHON").unwrap_or_else(|_| "python3".into());
    let python_prefix = std::env::var("PEFT_PEER_PYTHON_PREFIX").unwrap_or_else(|_| {
        if Path::new("/tmp/venv457/bin/python").exists() {
            "/tmp/venv457/bin/python".into()
        } else {
            python.clone()
        }
    });
    Some(PeerSetup {
        python,
        python_prefix,
        script,
    })
}

fn run_peer(peer: &PeerSetup, row: Row, num_labels: usize, s: &Settings) -> Result<Value, String> {
    let method = row.peer_method().ok_or("no peer row")?;
    let (model, task) = match row.model {
        ModelKind::MiniLm => (MINILM.to_string(), "classification"),
        ModelKind::Llama => (
            repo_root().join(LLAMA_DIR).display().to_string(),
            "causal-lm",
        ),
    };
    // transformers 5's BERT ignores past_key_values: prefix tuning on BERT needs the 4.x venv.
    let python = if row.model == ModelKind::MiniLm && row.method == Method::Prefix {
        &peer.python_prefix
    } else {
        &peer.python
    };
    let iters = s.peer_iters.to_string();
    let labels = num_labels.max(2).to_string();
    let mut cmd = Command::new(python);
    cmd.arg(&peer.script)
        .args([
            "steps", "--model", &model, "--task", task, "--method", method,
        ])
        .args(["--num-labels", &labels, "--batch", "16", "--seq", "64"])
        .args(["--threads", "2", "--iters", &iters, "--json", "-"])
        .current_dir(repo_root())
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{python} peft_cpu.py exited with {}", out.status));
    }
    let mut v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("peer output is not JSON: {e}"))?;
    if let Some(m) = v.as_object_mut() {
        m.insert("python".into(), json!(python));
    }
    Ok(v)
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "–".into())
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes_h(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else {
        format!("{:.0} kB", n / 1e3)
    }
}

/// The markdown tables.
fn render_markdown(results: &[Value], cold: &Value, meta: &Value) -> String {
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
                .map(thousands)
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
fn render_svg(results: &[Value], path: &Path) -> Res<()> {
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
