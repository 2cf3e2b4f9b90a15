//! (IA)³ (`peft_type: IA3`, crate `peft-ia3`) against Hugging Face PEFT 0.21.2 on the tiny
//! models, with the fixtures of `tests/fixtures/gen/ia3_tiny.py`: forward (active, merged,
//! unmerged, disabled), trainable counts, feedforward selection, the bundle in both directions
//! (PEFT's loads here; ours is PEFT's byte for byte in values and config, and `ia3/ours`, a bundle
//! we trained and saved, loads in PEFT to our outputs).

mod common;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, TensorData};
use burn_peft::core::bundle;
use burn_peft::core::{
    Adaptable, PeftConfigBase, PeftError, PeftModel, Site, SitePath, TargetModules,
};
use burn_peft::ia3::Ia3Config;
use burn_peft::models::HfModel;
use common::hf::{fixture, floats, inputs, load, logits, max_diff_valid, model_dir, read_all};
use serde_json::Value;

/// Parity tolerance against PEFT's float32 outputs (relative above magnitude 1).
const TOL: f32 = 1e-5;

/// `(case, model)` of the fixtures.
const CASES: [(&str, &str); 3] = [
    ("gpt2", "gpt2"),
    ("llama", "llama_gqa"),
    ("bert_cls", "bert_cls"),
];

fn run(model: &PeftModel<HfModel>, name: &str) -> Vec<f32> {
    let device = model.model().devices()[0].clone();
    let (inputs, _) = inputs(name, &device);
    logits(&model.model().forward(&inputs).unwrap())
}

fn check(model: &PeftModel<HfModel>, name: &str, file: &std::path::Path, key: &str, what: &str) {
    let (_, mask) = inputs(name, &Device::flex());
    let per_token = !name.ends_with("_cls");
    let ours = run(model, name);
    let diff = max_diff_valid(&ours, &floats(file, key), per_token.then_some(&mask[..]));
    eprintln!("{what}: max diff {diff:.2e}");
    assert!(diff < TOL, "{what}: differs from PEFT by {diff}");
}

fn loaded(case: &str, name: &str, device: &Device) -> PeftModel<HfModel> {
    let mut model = load(name, device);
    model
        .load_adapter_trainable(fixture("ia3").join(case), "default")
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    model
}

#[test]
fn forward_active_merged_unmerged_disabled_match_peft() {
    let device = Device::flex();
    for (case, name) in CASES {
        let expected = fixture("ia3").join(case).join("expected.safetensors");
        let mut model = loaded(case, name, &device);
        check(&model, name, &expected, "logits", &format!("{case} active"));
        model.merge().unwrap();
        check(
            &model,
            name,
            &expected,
            "merged_logits",
            &format!("{case} merged"),
        );
        model.unmerge().unwrap();
        check(
            &model,
            name,
            &expected,
            "logits",
            &format!("{case} unmerged"),
        );
        model.disable_adapters().unwrap();
        let base = model_dir(name).join("expected.safetensors");
        check(&model, name, &base, "logits", &format!("{case} disabled"));
        model.enable_adapters().unwrap();
        let plain = model.merge_and_unload().unwrap();
        let (inputs, mask) = inputs(name, &device);
        let ours = logits(&plain.forward(&inputs).unwrap());
        let per_token = !name.ends_with("_cls");
        let diff = max_diff_valid(
            &ours,
            &floats(&expected, "merged_logits"),
            per_token.then_some(&mask[..]),
        );
        assert!(
            diff < TOL,
            "{case} merge_and_unload differs from PEFT by {diff}"
        );
    }
}

#[test]
fn trainable_counts_and_feedforward_sites_match_peft() {
    let device = Device::flex();
    for (case, name) in CASES {
        let model = loaded(case, name, &device);
        let reference: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("ia3").join(case).join("trainable.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            model.trainable_report().to_string(),
            reference["print_trainable_parameters"].as_str().unwrap(),
            "{case}"
        );
        let mut feedforward = Vec::new();
        let mut adapted = 0;
        model
            .model()
            .visit_sites(&mut SitePath::root(), &mut |path, site| {
                if let Site::Linear(l) = site {
                    for a in &l.adapters {
                        adapted += 1;
                        // PEFT's layout says which: `[1, in]` scales inputs, `[out, 1]` outputs.
                        let (_, l) = &a.kernel.export(a)[0];
                        if l.shape()[0] == 1 {
                            feedforward.push(format!("base_model.model.{path}"));
                        }
                    }
                }
            });
        let theirs: Vec<String> = reference["feedforward"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(feedforward, theirs, "{case}: feedforward layers");
        assert!(
            adapted > feedforward.len(),
            "{case}: output-scaled layers too"
        );
    }
}

/// Saving what we loaded writes PEFT's file back: the same tensors (keys, shapes, values) and
/// the same config.
#[test]
fn saved_bundle_equals_peft_bundle() {
    let device = Device::flex();
    for (case, name) in CASES {
        let dir = fixture("ia3").join(case);
        let model = loaded(case, name, &device);
        let out = tempfile::tempdir().unwrap();
        model.save_adapter(out.path(), "default").unwrap();
        let ours = read_all(&out.path().join(bundle::WEIGHTS_FILE));
        let theirs = read_all(&dir.join(bundle::WEIGHTS_FILE));
        assert_eq!(ours, theirs, "{case}: tensors");
        assert!(
            ours.keys()
                .all(|k| k.ends_with(".ia3_l") || k.contains("classifier"))
        );
        let json = |p: &std::path::Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p.join(bundle::CONFIG_FILE)).unwrap())
                .unwrap()
        };
        assert_eq!(json(out.path()), json(&dir), "{case}: config");
    }
}

fn config() -> Ia3Config {
    Ia3Config {
        target_modules: Some(TargetModules::list(["k_proj", "v_proj", "down_proj"])),
        feedforward_modules: Some(TargetModules::list(["down_proj"])),
        base: PeftConfigBase::for_task("CAUSAL_LM"),
        ..Default::default()
    }
}

/// `l` starts at ones: a fresh adapter computes what the base model computes, and one training
/// step changes only the adapter.
#[test]
fn fresh_adapter_is_a_no_op_and_training_moves_only_l() {
    let device = Device::flex().autodiff();
    device.seed(8);
    let name = "llama_gqa";
    let mut model = load(name, &device);
    let base = run(&model, name);
    let base_weights: Vec<TensorData> = weights(&model);
    model.add_adapter("default", &config()).unwrap();
    assert_eq!(run(&model, name), base);
    // 2 layers x (k 16 + v 16 outputs, down_proj 64 inputs).
    assert_eq!(model.trainable_report().trainable, 2 * (16 + 16 + 64));
    step(&mut model, name);
    assert_eq!(weights(&model), base_weights, "the base stays frozen");
    assert_ne!(run(&model, name), base, "the adapter trained");
}

fn weights(model: &PeftModel<HfModel>) -> Vec<TensorData> {
    let mut out = Vec::new();
    model
        .model()
        .visit_sites(&mut SitePath::root(), &mut |_, site| {
            if let Site::Linear(l) = site {
                out.push(l.weight.val().into_data());
            }
        });
    out
}

fn step(model: &mut PeftModel<HfModel>, name: &str) {
    let device = model.model().devices()[0].clone();
    let (inputs, _) = inputs(name, &device);
    let out = model.model().forward(&inputs).unwrap().logits.unwrap();
    let loss = out.powf_scalar(2.0).mean();
    let grads = GradientsParams::from_grads(loss.backward(), model.model());
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init();
    model.update(|m| optim.step(1e-2, m, grads));
}

#[test]
fn configs_peft_refuses_or_completes_are_typed_errors() {
    // A missing `feedforward_modules` is completed from the model type's defaults when the
    // adapter is added (PEFT's `_prepare_adapter_config`), and saved so.
    let missing_ff =
        serde_json::json!({ "peft_type": "IA3", "target_modules": ["k_proj", "down_proj"] });
    let missing_ff = bundle::parse_config_value(missing_ff, None).unwrap().method;
    let mut llama = load("llama_gqa", &Device::flex());
    llama.add_adapter("default", missing_ff.as_ref()).unwrap();
    let saved = bundle::method_to_json(llama.adapter_config("default").unwrap());
    assert_eq!(
        saved["feedforward_modules"],
        serde_json::json!(["down_proj"])
    );
    assert_eq!(
        saved["target_modules"],
        serde_json::json!(["k_proj", "down_proj"])
    );
    let not_subset = serde_json::json!({
        "peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]
    });
    assert!(bundle::parse_config_value(not_subset, None).is_err());
    // An embedding target is not a site IA3 adapts (PEFT raises too).
    let mut model = load("llama_gqa", &Device::flex());
    let embedding = Ia3Config {
        target_modules: Some(TargetModules::list(["embed_tokens"])),
        feedforward_modules: Some(TargetModules::List(vec![])),
        ..Default::default()
    };
    match model.add_adapter("default", &embedding) {
        Err(PeftError::UnsupportedSite { path, .. }) => assert_eq!(path, "model.embed_tokens"),
        other => panic!("expected UnsupportedSite, got {other:?}"),
    }
}

/// Writes `tests/fixtures/ia3/ours/` (a bundle we trained and saved, plus our logits) for
/// `gen/check_ours.py`; run by hand when the format changes:
/// `cargo test --test ia3_parity -- --ignored write_ours_fixture`.
#[test]
#[ignore = "writes tests/fixtures/ia3/ours; run by hand, then gen/check_ours.py"]
fn write_ours_fixture() {
    let device = Device::flex().autodiff();
    device.seed(19);
    let name = "llama_gqa";
    let mut model = load(name, &device);
    model.add_adapter("default", &config()).unwrap();
    step(&mut model, name);
    let out = fixture("ia3/ours");
    model.save_adapter(out.join("adapter"), "default").unwrap();
    let active = run(&model, name);
    model.merge().unwrap();
    let merged = run(&model, name);
    let shape = vec![3, 7, active.len() / 21];
    let outputs = BTreeMap::from([
        ("logits".to_string(), TensorData::new(active, shape.clone())),
        ("merged_logits".to_string(), TensorData::new(merged, shape)),
    ]);
    std::fs::write(
        out.join("outputs.safetensors"),
        bundle::encode_safetensors(&outputs).unwrap(),
    )
    .unwrap();
    std::fs::write(out.join("model.txt"), "llama_gqa\n").unwrap();
}

/// The committed bundle we wrote (which `gen/check_ours.py` confirmed PEFT loads to the same
/// logits) still loads here to the logits we recorded.
#[test]
fn our_committed_bundle_reproduces_our_recorded_outputs() {
    let device = Device::flex();
    let name = "llama_gqa";
    let ours = fixture("ia3/ours");
    let mut model = load(name, &device);
    model.load_adapter(ours.join("adapter"), "default").unwrap();
    let outputs = ours.join("outputs.safetensors");
    check(&model, name, &outputs, "logits", "ours active");
    model.merge().unwrap();
    check(&model, name, &outputs, "merged_logits", "ours merged");
}
