//! The trainer on tiny fixture models: learning, frozen base, resume, atomic checkpoints,
//! NaN handling, TensorBoard files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use peft_core::{PeftMethod, PeftModel};
use peft_lora::LoraConfig;
use peft_models::{HfModel, Task, from_pretrained};
use peft_prefix::PrefixTuningConfig;
use peft_train::data::Example;
use peft_train::{TrainConfig, TrainError, Trainer, checkpoint, tensorboard};

/// Burn's random generator is shared by the process: tests that check bit-exact dropout draws
/// must not interleave.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// A learnable task: each row's tokens come from one of three id ranges, its class.
fn classification_data(n: usize, seed: u64) -> Vec<Example> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as i64
    };
    (0..n)
        .map(|_| {
            let class = next() % 3;
            let len = 4 + (next() % 4) as usize;
            let ids: Vec<i64> = (0..len).map(|_| 1 + class * 40 + next() % 40).collect();
            Example {
                label: Some(class as usize),
                token_type_ids: vec![0; ids.len()],
                input_ids: ids,
                labels: None,
                line: 0,
                segments: Vec::new(),
                image: None,
            }
        })
        .collect()
}

/// A learnable LM task: four fixed token sequences.
fn lm_data(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let start = 1 + (i as i64 % 4) * 20;
            let ids: Vec<i64> = (0..8).map(|k| start + 3 * k).collect();
            Example {
                token_type_ids: vec![0; ids.len()],
                labels: Some(ids.clone()),
                input_ids: ids,
                label: None,
                line: 0,
                segments: Vec::new(),
                image: None,
            }
        })
        .collect()
}

fn trainer(
    name: &str,
    method: &dyn PeftMethod,
    task: Task,
    config: TrainConfig,
    out: &Path,
) -> Trainer<HfModel> {
    let device = Device::flex().autodiff();
    device.seed(config.seed);
    let pretrained = from_pretrained(model_dir(name).to_str().unwrap(), task, &device).unwrap();
    let mut model = PeftModel::new(pretrained.model);
    model.add_adapter("default", method).unwrap();
    Trainer::builder(model, task)
        .adapters(["default"])
        .config(config)
        .output_dir(out.to_path_buf())
        .device(device)
        .build()
        .unwrap()
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Some(["query", "value"].into()),
        modules_to_save: Some(vec!["classifier".into()]),
        ..Default::default()
    }
}

fn quick(steps: u64) -> TrainConfig {
    TrainConfig {
        epochs: 100,
        max_steps: Some(steps),
        batch_size: 8,
        learning_rate: 3e-2,
        schedule: peft_train::schedule::Schedule::Constant,
        progress: false,
        ..Default::default()
    }
}

struct Snapshot(HashMap<ParamId, TensorData>);
impl ModuleVisitor for Snapshot {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.insert(param.id, param.val().to_data());
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn lora_learns_a_classification_task_and_leaves_the_base_untouched() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        eval_every: Some(40),
        ..quick(120)
    };
    let mut t = trainer(
        "bert_cls",
        &lora(),
        Task::SequenceClassification { num_labels: 3 },
        config,
        out.path(),
    );
    let mut before = Snapshot(HashMap::new());
    t.model().model().visit(&mut before);
    let trainable = t.model().trainable_param_ids().clone();
    let train = classification_data(240, 1);
    let eval = classification_data(60, 2);
    let start = t.evaluate(&eval).unwrap();
    let report = t.train(&train, Some(&eval), None).unwrap();
    let end = report.last_eval.clone().unwrap();
    eprintln!(
        "bert_cls LoRA: loss {:.3} -> {:.3}, eval acc {:.3} -> {:.3}, {:.2} steps/s, {:.0} tokens/s",
        mean(&report.losses[..5]),
        mean(&report.losses[report.losses.len() - 5..]),
        start.accuracy.unwrap(),
        end.accuracy.unwrap(),
        report.steps_per_sec,
        report.tokens_per_sec
    );
    assert_eq!(report.steps, 120);
    // Learning, not an exact curve: GEMM blocking (AVX-512 vs AVX2 kernels), the dropout draws
    // and the rounding of the fused kernels move this 8-row, lr 3e-2 run a lot (seeds 1-8:
    // last/first 5-step loss ratio 0.47-0.94, final eval accuracy 0.35-0.70, with fused or
    // composed ops alike), so compare 20-step loss means and the best evaluation (what the
    // trainer keeps in `best/`; 0.52-0.73 over those seeds); the final one must still improve.
    let losses = &report.losses;
    assert!(mean(&losses[losses.len() - 20..]) < 0.7 * mean(&losses[..20]));
    let (best, _) = report.best.expect("evaluated during training");
    assert!(best > start.accuracy.unwrap() + 0.2);
    assert!(end.accuracy.unwrap() > start.accuracy.unwrap());

    let mut after = Snapshot(HashMap::new());
    t.model().model().visit(&mut after);
    for (id, old) in &before.0 {
        if trainable.contains(id) {
            assert_ne!(old, &after.0[id], "trainable param {id} did not move");
        } else {
            assert_eq!(old, &after.0[id], "base param {id} changed");
        }
    }
    assert!(report.adapter_dir.join("adapter_config.json").is_file());
    assert!(out.path().join("best/adapter_model.safetensors").is_file());

    // The TensorBoard file parses (framing and CRCs) and holds the logged scalars.
    let runs = out.path().join("runs");
    let file = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let records = tensorboard::read_events(&file).unwrap();
    let text = format!("{records:?}");
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "eval/accuracy",
        "train/tokens_per_sec",
    ] {
        assert!(text.contains(tag), "{tag} missing from the event file");
    }
}

#[test]
fn causal_lm_and_prefix_tuning_train_through_the_same_api() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let lm_lora = LoraConfig {
        r: 4,
        target_modules: Some(["q_proj", "v_proj"].into()),
        ..Default::default()
    };
    let prefix = PrefixTuningConfig {
        num_virtual_tokens: 4,
        prefix_projection: true,
        ..Default::default()
    };
    for (method, label) in [(&lm_lora as &dyn PeftMethod, "lora"), (&prefix, "prefix")] {
        let dir = out.path().join(label);
        let mut t = trainer("llama_gqa", method, Task::CausalLm, quick(80), &dir);
        let data = lm_data(64);
        let report = t.train(&data, Some(&data[..16]), None).unwrap();
        let (first, last) = (
            mean(&report.losses[..4]),
            mean(&report.losses[report.losses.len() - 4..]),
        );
        eprintln!(
            "llama_gqa {label}: loss {first:.3} -> {last:.3}, {:.2} steps/s",
            report.steps_per_sec
        );
        assert!(
            last < 0.7 * first,
            "{label}: loss did not fall enough ({first} -> {last})"
        );
        assert!(report.last_eval.unwrap().perplexity.unwrap().is_finite());
    }
}

#[test]
fn resume_from_a_checkpoint_equals_the_uninterrupted_run() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        save_every: Some(4),
        keep_last: 10,
        grad_accum: 2,
        batch_size: 4,
        ..quick(12)
    };
    let train = classification_data(64, 3);
    let full_dir = out.path().join("full");
    let mut full = trainer(
        "bert_cls",
        &lora(),
        Task::SequenceClassification { num_labels: 3 },
        config.clone(),
        &full_dir,
    );
    let full_report = full.train(&train, None, None).unwrap();

    let ckpt = full_dir
        .join("checkpoints")
        .join(checkpoint::checkpoint_name(8));
    assert!(ckpt.is_dir());
    let resumed_dir = out.path().join("resumed");
    let mut resumed = trainer(
        "bert_cls",
        &lora(),
        Task::SequenceClassification { num_labels: 3 },
        config,
        &resumed_dir,
    );
    let resumed_report = resumed.train(&train, None, Some(&ckpt)).unwrap();
    assert_eq!(resumed_report.steps, 12);
    assert_eq!(
        resumed_report.losses, full_report.losses,
        "loss curves differ"
    );
    let bytes = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(
        bytes(&full_dir),
        bytes(&resumed_dir),
        "final adapters differ"
    );
}

#[test]
fn a_non_finite_loss_stops_with_the_documented_error() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        learning_rate: 1e30,
        max_grad_norm: None,
        save_every: Some(1),
        ..quick(20)
    };
    let train = classification_data(64, 5);
    let mut t = trainer(
        "bert_cls",
        &lora(),
        Task::SequenceClassification { num_labels: 3 },
        config,
        out.path(),
    );
    match t.train(&train, None, None) {
        Err(TrainError::NonFiniteLoss {
            step,
            last_checkpoint,
            ..
        }) => {
            let last = last_checkpoint.expect("a checkpoint was saved before");
            let loaded = checkpoint::load(&last).unwrap();
            assert_eq!(loaded.state.step, step);
            assert!(loaded.state.losses.iter().all(|l| l.is_finite()));
        }
        other => panic!("expected NonFiniteLoss, got {other:?}"),
    }
}

#[test]
fn resuming_a_checkpoint_of_another_rank_targets_or_optimizer_is_a_clear_error() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let train = classification_data(16, 5);
    let mut t = trainer(
        "bert_cls",
        &lora(),
        Task::SequenceClassification { num_labels: 3 },
        quick(2),
        out.path(),
    );
    t.train(&train, None, None).unwrap();
    let ckpt = checkpoint::latest(&out.path().join("checkpoints")).unwrap();
    let resume = |method: &LoraConfig| {
        let other = tempfile::tempdir().unwrap();
        let mut t = trainer(
            "bert_cls",
            method,
            Task::SequenceClassification { num_labels: 3 },
            quick(3),
            other.path(),
        );
        let snapshot = |m: &peft_models::HfModel| {
            let mut s = Snapshot(HashMap::new());
            m.visit(&mut s);
            s.0
        };
        let before = snapshot(t.model().model());
        let err = t.train(&train, None, Some(&ckpt)).unwrap_err();
        // Nothing was restored into the model.
        assert_eq!(snapshot(t.model().model()), before);
        assert!(matches!(err, TrainError::Checkpoint { .. }), "{err:?}");
        assert!(err.is_bad_input());
        err.to_string()
    };
    // Another rank: the first saved tensor of the wrong size is named.
    let msg = resume(&LoraConfig { r: 8, ..lora() });
    assert!(
        msg.contains("query.adapters.0.matrices.0") && msg.contains("another rank"),
        "{msg}"
    );
    // Other targets: a trainable parameter without a saved value, or the reverse.
    let msg = resume(&LoraConfig {
        target_modules: Some(["query", "key", "value"].into()),
        ..lora()
    });
    assert!(
        msg.contains("key") && msg.contains("another adapter config"),
        "{msg}"
    );
    let msg = resume(&LoraConfig {
        target_modules: Some(["query"].into()),
        ..lora()
    });
    assert!(
        msg.contains("value") && msg.contains("not a trainable parameter"),
        "{msg}"
    );

    // A damaged optimizer state: a moment without its partner.
    let file = ckpt.join("optimizer.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let all = st.tensors();
    let dropped = all
        .iter()
        .map(|(k, _)| k.clone())
        .find(|k| k.ends_with(".exp_avg_sq"))
        .unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> =
        all.into_iter().filter(|(k, _)| *k != dropped).collect();
    std::fs::write(&file, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let msg = resume(&lora());
    assert!(
        msg.contains("optimizer.safetensors") && msg.contains("is missing"),
        "{msg}"
    );
}
