//! The parity harness of a model family's fixtures (`tests/fixtures/gen/family_tiny.py`, one
//! generator per family): a new architecture's tests call [`check`] with the folders its
//! generator wrote. Everything is compared with transformers + PEFT within [`TOL`] at the valid
//! (non-pad) positions of the padded batch, and merged models round-trip through
//! `save_pretrained` as transformers would load them.

use std::collections::BTreeSet;
use std::path::Path;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use burn_peft::core::{PeftModel, bundle};
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use burn_peft::models::{
    GenerationConfig, HfModel, ModelInputs, Task, from_pretrained, generate, save_pretrained,
};

use super::hf::{inputs, logits, max_diff_valid, model_dir, read_all};

/// Parity tolerance (relative above magnitude 1) against transformers' float32 outputs.
pub const TOL: f32 = 1e-4;

/// A PEFT bundle folder beside the model (`models/<name>/<folder>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bundle {
    /// `lora/`: LoRA from `save_pretrained`, with `merged_logits` (and `greedy_ids` for LMs).
    Lora,
    /// `lora_bin/`: the same adapter as `adapter_model.bin` (a PyTorch pickle).
    LoraBin,
    /// `lora_default/`: LoRA without `target_modules`, completed by PEFT's default for the
    /// model type.
    LoraDefault,
    /// `dora/`: DoRA, with `merged_logits`.
    Dora,
    /// `ia3/`: (IA)³, with `merged_logits`.
    Ia3,
    /// `prefix/`: prefix tuning.
    Prefix,
}

impl Bundle {
    fn folder(self) -> &'static str {
        match self {
            Bundle::Lora => "lora",
            Bundle::LoraBin => "lora_bin",
            Bundle::LoraDefault => "lora_default",
            Bundle::Dora => "dora",
            Bundle::Ia3 => "ia3",
            Bundle::Prefix => "prefix",
        }
    }
}

fn base(name: &str, device: &Device) -> PeftModel<HfModel> {
    let pretrained = from_pretrained(model_dir(name).to_str().unwrap(), Task::Auto, device)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    PeftModel::new(pretrained.model)
}

/// Compare the model's logits on the fixture batch with `key` of `expected`; returns the
/// largest difference.
fn compare(model: &HfModel, inputs: &ModelInputs, mask: &[f32], expected: &Path, key: &str) -> f32 {
    let out = model.forward(inputs).unwrap();
    let ours = logits(&out);
    let theirs = read_all(expected)
        .remove(key)
        .unwrap_or_else(|| panic!("{key} in {}", expected.display()))
        .0;
    // Per-token outputs compare at valid positions; a classifier's one row per sequence
    // everywhere.
    let mask = out.logits.is_some().then_some(mask);
    let diff = max_diff_valid(&ours, &theirs, mask);
    assert!(
        diff < TOL,
        "{}: `{key}` differs from transformers + PEFT by {diff}",
        expected.display()
    );
    diff
}

/// Greedy ids of the fixture prompt with and without the KV cache, both equal to
/// `greedy_ids` of `expected` when the file has them; returns whether it had them.
fn greedy(model: &HfModel, expected: &Path, device: &Device) -> bool {
    let Some((want, _)) = read_all(expected).remove("greedy_ids") else {
        return false;
    };
    let want: Vec<i64> = want.iter().map(|v| *v as i64).collect();
    let prompt = &want[..4];
    let config = GenerationConfig {
        max_new_tokens: want.len() - prompt.len(),
        ..Default::default()
    };
    let cached = generate(model, prompt, &config, device).unwrap();
    let uncached = generate(
        model,
        prompt,
        &GenerationConfig {
            use_cache: false,
            ..config.clone()
        },
        device,
    )
    .unwrap();
    assert_eq!(
        cached,
        uncached,
        "{}: cached vs uncached",
        expected.display()
    );
    assert_eq!(cached, want, "{}: greedy ids", expected.display());
    true
}

/// The largest difference of each check, for the test's log.
#[derive(Debug, Default)]
pub struct Report {
    /// `(what, max |diff|)`.
    pub diffs: Vec<(String, f32)>,
    /// Greedy generations compared.
    pub generations: usize,
}

/// Check fixture `models/<name>` (base, each of `bundles`, merged models saved and reloaded,
/// greedy generation where the fixture has it) against transformers + PEFT.
pub fn check(name: &str, bundles: &[Bundle]) -> Report {
    let device = Device::flex();
    let (inputs, mask) = inputs(name, &device);
    let dir = model_dir(name);
    let mut report = Report::default();
    let model = base(name, &device);
    let expected = dir.join("expected.safetensors");
    let diff = compare(model.model(), &inputs, &mask, &expected, "logits");
    report.diffs.push(("base".into(), diff));
    report.generations += usize::from(greedy(model.model(), &expected, &device));

    for &b in bundles {
        let folder = dir.join(b.folder());
        let expected = folder.join("expected.safetensors");
        let mut model = base(name, &device);
        model
            .load_adapter(&folder, "default")
            .unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
        let diff = compare(model.model(), &inputs, &mask, &expected, "logits");
        report.diffs.push((b.folder().into(), diff));
        report.generations += usize::from(greedy(model.model(), &expected, &device));
        if b == Bundle::LoraDefault {
            defaults_match_peft(name, &folder, &device);
        }
        if read_all(&expected).contains_key("merged_logits") {
            model.merge().unwrap();
            let diff = compare(model.model(), &inputs, &mask, &expected, "merged_logits");
            report.diffs.push((format!("{} merged", b.folder()), diff));
            let merged = model.merge_and_unload().unwrap();
            let diff = saved_and_reloaded(name, merged, &inputs, &mask, &expected);
            report.diffs.push((format!("{} saved", b.folder()), diff));
        }
    }
    eprintln!("{name}: {report:?}");
    report
}

/// PEFT's default `target_modules` for the model type: what a LoRA config without targets
/// gets here equals what PEFT wrote into `lora_default/adapter_config.json`.
fn defaults_match_peft(name: &str, folder: &Path, device: &Device) {
    let mut model = base(name, device);
    model
        .add_adapter("default", &LoraConfig::default())
        .unwrap();
    let ours = bundle::method_to_json(model.adapter_config("default").unwrap());
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("adapter_config.json")).unwrap())
            .unwrap();
    let set = |v: &serde_json::Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap_or_else(|| panic!("a target list: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        set(&ours["target_modules"]),
        set(&theirs["target_modules"]),
        "{name}: PEFT's default target_modules"
    );
}

/// Save `merged` with `save_pretrained`, load the folder again, and compare with
/// `merged_logits`: what transformers would load is what PEFT's merge computes.
fn saved_and_reloaded(
    name: &str,
    merged: HfModel,
    inputs: &ModelInputs,
    mask: &[f32],
    expected: &Path,
) -> f32 {
    let device = Device::flex();
    let source = from_pretrained(model_dir(name).to_str().unwrap(), Task::Auto, &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let saved = save_pretrained(&merged, &source.config, &source.dir, &out, None).unwrap();
    assert_eq!(
        serde_json::Value::String(saved.architecture),
        source.config.raw["architectures"][0],
        "{name}: the saved class"
    );
    let reloaded = from_pretrained(out.to_str().unwrap(), Task::Auto, &device).unwrap();
    compare(&reloaded.model, inputs, mask, expected, "merged_logits")
}

/// A few AdamW steps of a fresh LoRA on all linear layers lower the mean squared logit (any
/// differentiable target will do): the family trains, and only the adapter moves.
pub fn trains(name: &str) {
    let device = Device::flex().autodiff();
    device.seed(3);
    let (batch, _) = inputs(name, &device);
    let mut model = base(name, &device);
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some("all-linear".into()),
        ..Default::default()
    };
    model.add_adapter("default", &lora).unwrap();
    let loss = |m: &HfModel| -> Tensor<1> {
        let out = m.forward(&batch).unwrap();
        let l = out.logits.map(|l| l.powf_scalar(2.0).mean());
        l.unwrap_or_else(|| out.class_logits.unwrap().powf_scalar(2.0).mean())
    };
    let value = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap()[0];
    let first = value(loss(model.model()));
    let before_training = model.model().clone();
    let mut optim = AdamWConfig::new().with_epsilon(1e-8).init();
    for _ in 0..3 {
        let l = loss(model.model());
        let grads = GradientsParams::from_grads(l.backward(), model.model());
        assert!(!grads.is_empty(), "{name}: the adapter gets gradients");
        model.update(|m| optim.step(1e-2, m, grads));
    }
    let last = value(loss(model.model()));
    eprintln!("{name}: training loss {first} -> {last}");
    assert!(last < first, "{name}: {first} -> {last}");
    // The base did not move: with the adapter disabled the model is the one before training.
    model.disable_adapters().unwrap();
    let (plain_inputs, _) = inputs(name, &Device::flex());
    let now = logits(&model.model().valid().forward(&plain_inputs).unwrap());
    let before = logits(&before_training.valid().forward(&plain_inputs).unwrap());
    assert_eq!(now, before, "{name}: base weights changed in training");
}

/// A mixed-adapter batch (PEFT's `adapter_names`): the fixture's LoRA on row 0, the base on
/// row 1, a second LoRA on row 2 give at their valid positions what each row gives alone.
pub fn mixed_batch(name: &str) {
    let device = Device::flex();
    let (batch, mask) = inputs(name, &device);
    let mut model = base(name, &device);
    model
        .load_adapter(model_dir(name).join("lora"), "a")
        .unwrap();
    device.seed(5);
    let second = LoraConfig {
        r: 2,
        lora_alpha: 4.0,
        init_lora_weights: InitLoraWeights::Bool(false),
        target_modules: Some("all-linear".into()),
        ..Default::default()
    };
    model.add_adapter("b", &second).unwrap();
    let names = ["a", "__base__", "b"];
    let ctx = model.adapter_rows(&names, &device).unwrap();
    let mixed = logits(&model.model().forward_with(&batch, &ctx).unwrap());
    let per_row = mixed.len() / names.len();
    let width = mask.len() / names.len();
    for (row, adapter) in names.iter().enumerate() {
        if *adapter == "__base__" {
            model.disable_adapters().unwrap();
        } else {
            model.enable_adapters().unwrap();
            model.set_adapter(adapter).unwrap();
        }
        let alone = logits(&model.model().forward(&batch).unwrap());
        let range = row * per_row..(row + 1) * per_row;
        let row_mask = &mask[row * width..(row + 1) * width];
        let diff = max_diff_valid(&mixed[range.clone()], &alone[range], Some(row_mask));
        assert!(
            diff < 1e-5,
            "{name}: row {row} ({adapter}) differs by {diff}"
        );
    }
}
