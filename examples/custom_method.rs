//! A PEFT method written outside the workspace crates, in this one file: **bias offsets**
//! (BitFit-style, Ben Zaken et al. 2021: fine-tune only bias terms). At every targeted linear
//! layer a learned vector `δ` (`[out]`, zero at start) is added to the output,
//! `y = x·W + b + δ`; merging folds it into the bias (`b' = b + δ`), so the merged model is the
//! base model with new biases and zero added latency.
//!
//! The method registers itself under `peft_type: BIAS_OFFSET` (typetag) and then goes through
//! the same paths as the shipped methods, with no edit to any workspace crate:
//!
//! 1. a run config in the format of `burn-peft train` (written as YAML in flow style, which
//!    JSON parsers read too) whose `method:` block is parsed exactly as the CLI parses it
//!    (`peft_core::bundle::parse_config_value`, after PEFT's task defaults);
//! 2. a model folder (the tiny BERT classifier fixture plus a word-level `tokenizer.json`) and
//!    JSONL data files, read by `peft_models::from_pretrained` and `peft_train::data`;
//! 3. `PeftModel::add_adapter`, training with `peft_train::Trainer` (checkpoints, best adapter,
//!    PEFT bundle), `load_adapter` into a fresh model, `merge_and_unload`;
//! 4. `describe()`, the summary `burn-peft inspect` shows.
//!
//! `cargo run --example custom_method [-- OUT_DIR]` (default `out/custom_method`; about 10 s in
//! the dev profile). See docs/custom-method.md.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use burn_peft::core::bundle::{self, parse_config_value};
use burn_peft::core::{
    AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, MethodSummary, PeftError,
    PeftMethod, PeftModel, Result, SiteInfo, SiteKind, TargetModules, TargetSpec, TensorRole,
    TensorSource, peft_type_of,
};
use burn_peft::models::{HfModel, HfTokenizer, Task, from_pretrained};
use burn_peft::train::data::{DataConfig, TaskKind, load_examples};
use burn_peft::train::{TrainConfig, TrainOptions, Trainer, evaluate};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// 1. The method: a serializable config (its JSON is `adapter_config.json`).
// ---------------------------------------------------------------------------------------------

/// Bias offsets on the targeted linear layers. The fields are what `adapter_config.json` holds;
/// `task_type`, `modules_to_save` and `base_model_name_or_path` are the PEFT fields every
/// method should keep (the CLI and `PeftModel` fill them in).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BiasOffsetConfig {
    /// Modules to adapt: names (exact or dot-bounded suffix), a full-match regex, or
    /// `"all-linear"` (PEFT's matching rules, applied by `peft-core`).
    pub target_modules: Option<TargetModules>,
    /// Modules never to adapt.
    pub exclude_modules: Option<TargetModules>,
    /// Modules that get a trainable, saved copy (a classification head).
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT's task type (`SEQ_CLS`, `CAUSAL_LM`).
    pub task_type: Option<String>,
    /// Written by `PeftModel::with_base_model_name`.
    pub base_model_name_or_path: Option<String>,
}

/// The bundle name of the offset, relative to the layer's path:
/// `base_model.model.<path>.bias_offset`.
const OFFSET: &str = "bias_offset";

#[typetag::serde(name = "BIAS_OFFSET")]
impl PeftMethod for BiasOffsetConfig {
    fn targets(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            ..Default::default()
        }
    }

    fn modules_to_save(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }

    fn task_type(&self) -> Option<&str> {
        self.task_type.as_deref()
    }

    fn validate(&self) -> Result<()> {
        if self.target_modules.is_none() {
            return Err(PeftError::invalid_config(
                "target_modules",
                "missing: name the linear layers whose bias gets an offset",
            ));
        }
        Ok(())
    }

    /// Linear layers with a bias: merging writes the offset into it.
    fn supports(&self, kind: &SiteKind) -> bool {
        matches!(kind, SiteKind::Linear { bias: true, .. })
    }

    fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState> {
        let SiteKind::Linear { d_output, .. } = site.kind else {
            return Err(PeftError::UnsupportedSite {
                path: site.path.clone(),
                kind: site.kind.name().into(),
                method: "BIAS_OFFSET".into(),
            });
        };
        // Zero at start: the adapted model starts as the base model.
        let offset = Tensor::<1>::zeros([d_output], &site.device);
        Ok(AdapterState::new(
            name,
            vec![],
            vec![offset],
            Arc::new(BiasOffsetKernel),
        ))
    }

    fn describe(&self) -> MethodSummary {
        MethodSummary::from_config(
            self,
            &["target_modules", "exclude_modules", "modules_to_save"],
            vec![TensorRole::new(
                OFFSET,
                "learned offset added to the layer's output (folded into its bias) [out]",
            )],
        )
    }

    fn clone_method(&self) -> Box<dyn PeftMethod> {
        Box::new(self.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// 2. The kernel: what the adapter does at a layer (`vectors[0]` is δ).
// ---------------------------------------------------------------------------------------------

/// The behaviour of [`BiasOffsetConfig`] at one linear layer.
#[derive(Debug)]
pub struct BiasOffsetKernel;

impl AdapterKernel for BiasOffsetKernel {
    /// `y + δ`, broadcast over the rows (`y` is `[n, out]`).
    fn forward_linear(
        &self,
        state: &AdapterState,
        _base: &BaseWeights,
        _x: Tensor<2>,
        y: Tensor<2>,
    ) -> Tensor<2> {
        y + state.vectors[0].val().unsqueeze::<2>()
    }

    /// `b ± δ`; the weight is untouched.
    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        let offset = state.vectors[0].val();
        let bias = site.current.bias.ok_or_else(|| {
            PeftError::InvalidState(format!("`{}`: the layer has no bias", state.name))
        })?;
        let bias = match direction {
            MergeDirection::Merge => bias + offset,
            MergeDirection::Unmerge => bias - offset,
        };
        Ok(BaseWeights {
            weight: site.current.weight,
            bias: Some(bias),
        })
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        vec![(OFFSET.into(), state.vectors[0].val().into_data())]
    }

    fn import(
        &self,
        mut state: AdapterState,
        source: &mut dyn TensorSource,
    ) -> Result<AdapterState> {
        let data = source.take(OFFSET, &state.vectors[0].dims())?;
        state.set_vector(0, data);
        Ok(state)
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A model folder, data files and a run config, as `burn-peft train` takes them.
// ---------------------------------------------------------------------------------------------

/// Three topics of four words each; an example's class is the topic most of its words come
/// from.
const TOPICS: [[&str; 4]; 3] = [
    ["red", "green", "blue", "yellow"],
    ["cat", "dog", "horse", "bird"],
    ["bread", "rice", "apple", "cheese"],
];
const FILLERS: [&str; 4] = ["the", "a", "and", "very"];
const SPECIALS: [&str; 4] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];

/// The tiny BERT classifier fixture (3 labels, vocabulary 128) with a word-level tokenizer for
/// the words above: a complete Hugging Face model folder.
fn write_model_folder(dir: &Path) -> std::io::Result<()> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/bert_cls");
    fs::create_dir_all(dir)?;
    for file in ["config.json", "model.safetensors"] {
        fs::copy(fixture.join(file), dir.join(file))?;
    }
    let words = SPECIALS
        .iter()
        .chain(TOPICS.iter().flatten())
        .chain(FILLERS.iter());
    let vocab: serde_json::Map<String, Value> = words
        .enumerate()
        .map(|(id, w)| (w.to_string(), json!(id)))
        .collect();
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    fs::write(dir.join("tokenizer.json"), tokenizer.to_string())
}

/// `n` labelled texts (JSONL), from a fixed seed.
fn write_data(file: &Path, n: usize, seed: u64) -> std::io::Result<()> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = |k: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % k as u64) as usize
    };
    let mut lines = String::new();
    for _ in 0..n {
        let label = next(3);
        let mut words: Vec<&str> = (0..4).map(|_| TOPICS[label][next(4)]).collect();
        words.push(TOPICS[(label + 1 + next(2)) % 3][next(4)]);
        words.push(FILLERS[next(4)]);
        for i in (1..words.len()).rev() {
            words.swap(i, next(i + 1));
        }
        lines.push_str(&json!({"text": words.join(" "), "label": label}).to_string());
        lines.push('\n');
    }
    fs::write(file, lines)
}

/// The run config: the six keys of `burn-peft train`'s YAML. Flow style, so JSON readers parse
/// it too; block style works the same in the CLI.
fn run_config() -> Value {
    json!({
        "model": {"name_or_path": "model", "task": "classification"},
        "method": {
            "peft_type": "BIAS_OFFSET",
            "target_modules": ["query", "value", "dense"],
        },
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "max_length": 16},
        "train": {
            "epochs": 4,
            "batch_size": 16,
            "learning_rate": 0.05,
            "warmup_ratio": 0.1,
            "progress": false,
            "seed": 7,
        },
        "output": "run",
        "device": "flex",
    })
}

/// What `burn-peft train` does to a `method:` block before parsing it: `task_type` from
/// `model.task`. For `SEQ_CLS`, `PeftModel::add_adapter` then appends the heads `classifier`
/// and `score` to `modules_to_save` (PEFT's rule, in peft-core), so the new classification head
/// trains and is saved with the adapter.
fn with_task_defaults(mut method: Value) -> Value {
    if let Value::Object(map) = &mut method {
        map.entry("task_type").or_insert(json!("SEQ_CLS"));
    }
    method
}

// ---------------------------------------------------------------------------------------------
// 4. The run: parse, train, save, load, merge.
// ---------------------------------------------------------------------------------------------

fn main() -> std::result::Result<(), Box<dyn Error>> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "out/custom_method".into()),
    );
    let registered = bundle::registered_methods();
    println!("registered methods: {}", registered.join(", "));
    assert!(registered.iter().any(|m| m == "BIAS_OFFSET"));

    // The files a user would have: a model folder, data, a run config.
    write_model_folder(&out.join("model"))?;
    fs::create_dir_all(out.join("data"))?;
    write_data(&out.join("data/train.jsonl"), 240, 1)?;
    write_data(&out.join("data/eval.jsonl"), 60, 2)?;
    let config_file = out.join("run.yaml");
    fs::write(&config_file, serde_json::to_string_pretty(&run_config())?)?;

    // Read it back as `burn-peft train` does: the method block through the method registry.
    let run: Value = serde_json::from_str(&fs::read_to_string(&config_file)?)?;
    let method = parse_config_value(
        with_task_defaults(run["method"].clone()),
        Some(&config_file),
    )?
    .method;
    let train_config: TrainConfig = serde_json::from_value(run["train"].clone())?;
    let at = |key: &str| out.join(run["data"][key].as_str().unwrap_or_default());
    let model_dir = out.join(run["model"]["name_or_path"].as_str().unwrap_or_default());
    println!(
        "{}: method {}",
        config_file.display(),
        peft_type_of(method.as_ref())
    );
    let summary = method.describe();
    for (key, value) in &summary.entries {
        println!("  {key}: {value}");
    }
    for role in &summary.tensors {
        println!("  tensor `{}`: {}", role.suffix, role.description);
    }

    let device = Device::flex().autodiff();
    device.seed(train_config.seed);
    let tokenizer = HfTokenizer::from_dir(&model_dir)?;
    let reader = DataConfig {
        max_length: run["data"]["max_length"].as_u64().unwrap_or(16) as usize,
        ..Default::default()
    };
    let kind = TaskKind::Classification;
    let (train, labels) = load_examples(&at("train"), kind, &reader, &tokenizer, None, None)?;
    let labels = labels.ok_or("no labels in the training data")?;
    let (eval, _) = load_examples(&at("eval"), kind, &reader, &tokenizer, None, Some(&labels))?;
    let num_labels = labels.len();
    let task = Task::SequenceClassification { num_labels };
    let source = model_dir.to_string_lossy().into_owned();

    let mut model = PeftModel::new(from_pretrained(&source, task, &device)?.model)
        .with_base_model_name(source.clone());
    let report = model.add_adapter("default", method.as_ref())?;
    println!(
        "{} layers get an offset, {} a trainable copy; {}",
        report.adapted.len(),
        report.saved_copies.len(),
        model.trainable_report()
    );
    let objective = Task::SequenceClassification { num_labels };
    let pad_id = i64::from(tokenizer.pad_id());
    let score =
        |model: &PeftModel<HfModel>| evaluate(model.model(), &eval, objective, pad_id, 32, &device);
    let before = score(&model)?;

    let mut trainer = Trainer::builder(model, objective)
        .adapters(["default"])
        .config(train_config)
        .output_dir(out.join(run["output"].as_str().unwrap_or("run")))
        .device(device.clone())
        .pad_id(pad_id)
        .build()?;
    // The example writes its whole folder afresh on every run, so its run folder is its own
    // to start over in (`burn-peft train --overwrite`).
    let options = TrainOptions {
        overwrite: true,
        ..TrainOptions::default()
    };
    let result = trainer.train_with(&train, Some(&eval), None, options)?;
    let trained = trainer.evaluate(&eval)?;
    let (first, last) = (
        result.losses.first().copied().unwrap_or_default(),
        result.losses.last().copied().unwrap_or_default(),
    );
    println!(
        "trained {} steps: train loss {first:.3} -> {last:.3}; eval accuracy {:.3} -> {:.3}",
        result.steps,
        before.accuracy.unwrap_or_default(),
        trained.accuracy.unwrap_or_default(),
    );
    println!("saved {}", result.adapter_dir.display());

    // A fresh base model loads the bundle and computes the same.
    let mut reloaded = PeftModel::new(from_pretrained(&source, task, &device)?.model);
    reloaded.load_adapter(&result.adapter_dir, "default")?;
    let again = score(&reloaded)?;
    let reload_diff = (again.loss - trained.loss).abs();
    println!(
        "reloaded: eval loss {:.6} (|diff| {reload_diff:.1e})",
        again.loss
    );

    // Merged away: the base model with new biases.
    let merged = PeftModel::new(reloaded.merge_and_unload()?);
    let folded = score(&merged)?;
    let merge_diff = (folded.loss - trained.loss).abs();
    println!(
        "merged: eval loss {:.6} (|diff| {merge_diff:.1e})",
        folded.loss
    );

    let improved = trained.loss < before.loss;
    if !improved
        || reload_diff > 1e-5
        || merge_diff > 1e-4
        || again.predictions != trained.predictions
    {
        return Err("the custom method did not train, reload or merge as expected".into());
    }
    Ok(())
}
