//! DoRA (`use_dora: true` in a LORA config) against Hugging Face PEFT 0.21.2 on the tiny models,
//! with the fixtures of `tests/fixtures/gen/dora_tiny.py`: forward (active, merged, unmerged,
//! disabled), two stacked adapters and their merge, one backward pass's gradients, trainable
//! counts, the bundle we write, and a bundle we wrote that PEFT loads (`dora/ours`).

mod common;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use burn_peft::core::bundle::{self, TensorFile};
use burn_peft::core::{PeftConfigBase, PeftMethod, TargetModules};
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use common::hf::{adapter_grads, fixture, floats, inputs, load, max_diff_valid, read_all};
use serde_json::Value;

/// Parity tolerance against PEFT's float32 numbers (relative above magnitude 1).
const TOL: f32 = 1e-5;

fn lm_logits(
    model: &burn_peft::core::PeftModel<burn_peft::models::HfModel>,
    name: &str,
) -> Vec<f32> {
    let device = model.model().devices()[0].clone();
    let (inputs, _) = inputs(name, &device);
    let out = model.model().forward(&inputs).unwrap();
    out.logits
        .expect("a causal LM")
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

fn check(ours: &[f32], file: &std::path::Path, key: &str, mask: &[f32], what: &str) {
    let theirs = floats(file, key);
    let diff = max_diff_valid(ours, &theirs, Some(mask));
    eprintln!("{what}: max diff {diff:.2e}");
    assert!(diff < TOL, "{what}: differs from PEFT by {diff}");
}

/// Active, merged, unmerged, disabled and merge_and_unload for the bundle in `dora/<case>`.
fn forward_parity(case: &str, name: &str) {
    let device = Device::flex();
    let (_, mask) = inputs(name, &device);
    let expected = fixture("dora").join(case).join("expected.safetensors");
    let mut model = load(name, &device);
    model
        .load_adapter(fixture("dora").join(case), "default")
        .unwrap();
    let method = model.adapter_config("default").unwrap();
    assert_eq!(bundle::method_to_json(method)["use_dora"], true);

    let active = lm_logits(&model, name);
    check(
        &active,
        &expected,
        "logits",
        &mask,
        &format!("{case} active"),
    );
    // Disabled is the base model (PEFT asserts the same of its side; the base model against
    // transformers is tests/it/models_parity.rs).
    let base = lm_logits(&load(name, &device), name);
    model.disable_adapters().unwrap();
    assert_eq!(lm_logits(&model, name), base, "{case} disabled");
    model.enable_adapters().unwrap();
    model.merge().unwrap();
    let merged = lm_logits(&model, name);
    check(
        &merged,
        &expected,
        "merged_logits",
        &mask,
        &format!("{case} merged"),
    );
    // Merge + unmerge leaves rounding in the base weights, as in PEFT.
    model.unmerge().unwrap();
    check(
        &lm_logits(&model, name),
        &expected,
        "logits",
        &mask,
        &format!("{case} unmerged"),
    );
    let plain = model.merge_and_unload().unwrap();
    let (inputs, _) = inputs(name, &device);
    let unloaded = plain.forward(&inputs).unwrap().logits.unwrap();
    let unloaded = unloaded.into_data().try_to_vec::<f32>().unwrap();
    check(
        &unloaded,
        &expected,
        "merged_logits",
        &mask,
        &format!("{case} merge_and_unload"),
    );
}

#[test]
fn gpt2_conv1d_dora_matches_peft() {
    forward_parity("gpt2", "gpt2");
}

#[test]
fn llama_dora_with_embedding_matches_peft() {
    forward_parity("llama", "llama_gqa");
}

#[test]
fn two_stacked_dora_adapters_and_their_merge_match_peft() {
    let device = Device::flex();
    let name = "llama_gqa";
    let (_, mask) = inputs(name, &device);
    let expected = fixture("dora/llama/expected.safetensors");
    let mut model = load(name, &device);
    model
        .load_adapter(fixture("dora/llama"), "default")
        .unwrap();
    model
        .load_adapter(fixture("dora/llama/second"), "second")
        .unwrap();
    model.set_adapters(&["default", "second"]).unwrap();
    check(
        &lm_logits(&model, name),
        &expected,
        "both_logits",
        &mask,
        "both active",
    );
    // v_proj carries both adapters: the second one's norm comes from the unmerged base weight.
    model.merge().unwrap();
    check(
        &lm_logits(&model, name),
        &expected,
        "both_logits",
        &mask,
        "both merged (vs active)",
    );
    check(
        &lm_logits(&model, name),
        &expected,
        "both_merged_logits",
        &mask,
        "both merged",
    );
    model.set_adapter("second").unwrap(); // unmerges both first
    check(
        &lm_logits(&model, name),
        &expected,
        "second_logits",
        &mask,
        "second only",
    );
    model.set_adapter("default").unwrap();
    check(
        &lm_logits(&model, name),
        &expected,
        "logits",
        &mask,
        "default after unmerge",
    );
}

/// Largest difference relative to the reference tensor's largest magnitude (at least 1).
///
/// Gradients are sums over every position of the batch: an entry of size 2 next to entries of
/// size 70 carries float32 rounding of the size-70 terms (~1e-5 absolute), so an element-wise
/// relative bound would test the rounding; this is `allclose` with a tolerance scaled to the
/// tensor, which measured ~1e-6 here.
fn max_scaled_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    worst / scale
}

/// One backward pass of `sum(logits · probe)` on the autodiff device gives PEFT's gradients for
/// every adapter tensor (A, B and the magnitude), and the same loss.
fn gradient_parity(case: &str, name: &str) {
    let device = Device::flex().autodiff();
    let (inputs, _) = inputs(name, &device);
    let dir = fixture("dora").join(case);
    let mut model = load(name, &device);
    // Trainable, as PEFT's `get_peft_model` adapter the gradients were taken from.
    model.load_adapter_trainable(&dir, "default").unwrap();
    let expected = read_all(&dir.join("expected.safetensors"));
    let (probe, shape) = expected["probe"].clone();
    let probe = Tensor::<3>::from_data(TensorData::new(probe, shape), &device);
    let logits = model.model().forward(&inputs).unwrap().logits.unwrap();
    let loss = (logits * probe).sum();
    let ours_loss = loss.clone().into_data().try_to_vec::<f32>().unwrap();
    let diff = max_scaled_diff(&ours_loss, &expected["loss"].0);
    eprintln!("{case}: loss {ours_loss:?}, diff {diff:.2e}");
    assert!(diff < TOL, "{case}: loss differs from PEFT by {diff}");

    let grads = loss.backward();
    let ours = adapter_grads(&model, "default", &grads);
    let theirs = read_all(&dir.join("grads.safetensors"));
    let theirs: BTreeMap<String, Vec<f32>> = theirs.into_iter().map(|(k, v)| (k, v.0)).collect();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "{case}: gradient names"
    );
    let mut worst = 0.0f32;
    for (key, g) in &ours {
        let diff = max_scaled_diff(g, &theirs[key]);
        worst = worst.max(diff);
        assert!(
            diff < TOL,
            "{case}: gradient of `{key}` differs from PEFT by {diff}"
        );
    }
    let magnitudes = ours
        .keys()
        .filter(|k| k.ends_with("lora_magnitude_vector"))
        .count();
    assert!(magnitudes > 0, "{case}: the magnitudes get gradients");
    eprintln!("{case}: {} gradients, worst diff {worst:.2e}", ours.len());
}

#[test]
fn gpt2_dora_gradients_match_peft() {
    gradient_parity("gpt2", "gpt2");
}

#[test]
fn llama_dora_gradients_match_peft() {
    gradient_parity("llama", "llama_gqa");
}

#[test]
fn trainable_report_equals_print_trainable_parameters() {
    let device = Device::flex();
    for (case, name, second) in [("gpt2", "gpt2", false), ("llama", "llama_gqa", true)] {
        let mut model = load(name, &device);
        let dir = fixture("dora").join(case);
        // Trainable, as in PEFT's `get_peft_model` (a bundle loaded for inference trains
        // nothing: `loaded_adapters_are_frozen_unless_asked_to_train`).
        model.load_adapter_trainable(&dir, "default").unwrap();
        if second {
            model
                .load_adapter_trainable(dir.join("second"), "second")
                .unwrap();
        }
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainable.json")).unwrap())
                .unwrap();
        assert_eq!(
            model.trainable_report().to_string(),
            reference["print_trainable_parameters"].as_str().unwrap(),
            "{case}"
        );
    }
}

fn dora_config(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: true,
        target_modules: Some(TargetModules::list(targets.iter().copied())),
        init_lora_weights: InitLoraWeights::Bool(false),
        use_dora: true,
        base: PeftConfigBase::for_task("CAUSAL_LM"),
        ..Default::default()
    }
}

/// At initialization the magnitude is `‖W + s·B·A‖`, so DoRA computes what LoRA computes with
/// the same A and B: a fresh DoRA adapter against a LoRA adapter loaded with its A and B.
#[test]
fn fresh_dora_adapter_computes_what_lora_computes() {
    let device = Device::flex();
    let name = "llama_gqa";
    let (_, mask) = inputs(name, &device);
    let dora = dora_config(&["q_proj", "v_proj", "down_proj", "embed_tokens"]);
    let mut with_dora = load(name, &device);
    with_dora.add_adapter("default", &dora).unwrap();
    let lora_only: BTreeMap<String, TensorData> = with_dora
        .adapter_tensors("default")
        .unwrap()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("lora_magnitude_vector"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let lora = LoraConfig {
        use_dora: false,
        ..dora.clone()
    };
    std::fs::write(
        dir.path().join(bundle::CONFIG_FILE),
        bundle::render_config(&bundle::method_to_json(&lora)),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(bundle::WEIGHTS_FILE),
        bundle::encode_safetensors(&lora_only).unwrap(),
    )
    .unwrap();
    let mut with_lora = load(name, &device);
    with_lora.load_adapter(dir.path(), "default").unwrap();
    let diff = max_diff_valid(
        &lm_logits(&with_dora, name),
        &lm_logits(&with_lora, name),
        Some(&mask),
    );
    assert!(diff < TOL, "fresh DoRA differs from LoRA by {diff}");
}

/// Our bundle holds PEFT's keys and shapes (PEFT also saves the targeted embedding's base table
/// as `base_layer.weight`, which carries no adapter state), and the config says `use_dora`.
#[test]
fn saved_bundle_has_peft_keys_and_shapes() {
    let device = Device::flex();
    let dir = fixture("dora/llama");
    let mut model = load("llama_gqa", &device);
    model.load_adapter(&dir, "default").unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save_adapter(out.path(), "default").unwrap();
    let shapes = |path: &std::path::Path| -> BTreeMap<String, Vec<usize>> {
        read_all(&path.join(bundle::WEIGHTS_FILE))
            .into_iter()
            .filter(|(k, _)| !k.ends_with(".base_layer.weight"))
            .map(|(k, v)| (k, v.1))
            .collect()
    };
    assert_eq!(shapes(out.path()), shapes(&dir));
    let theirs = read_all(&dir.join(bundle::WEIGHTS_FILE));
    for (key, (values, _)) in read_all(&out.path().join(bundle::WEIGHTS_FILE)) {
        assert_eq!(values, theirs[&key].0, "{key} round-trips exactly");
    }
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join(bundle::CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(config["use_dora"], true);
    assert_eq!(config["peft_type"], "LORA");
}

/// A DoRA bundle without its magnitudes is refused with a typed error naming the key.
#[test]
fn missing_magnitude_is_a_typed_error() {
    let device = Device::flex();
    let dir = fixture("dora/gpt2");
    let bad = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.join(bundle::CONFIG_FILE),
        bad.path().join(bundle::CONFIG_FILE),
    )
    .unwrap();
    let mut tensors = TensorFile::read(&dir.join(bundle::WEIGHTS_FILE)).unwrap();
    let kept: BTreeMap<String, TensorData> = read_all(&dir.join(bundle::WEIGHTS_FILE))
        .into_iter()
        .filter(|(k, _)| !k.ends_with("h.1.attn.c_attn.lora_magnitude_vector"))
        .map(|(k, (_, shape))| {
            let data = tensors.take(&k, &shape).unwrap();
            (k, data)
        })
        .collect();
    std::fs::write(
        bad.path().join(bundle::WEIGHTS_FILE),
        bundle::encode_safetensors(&kept).unwrap(),
    )
    .unwrap();
    let mut model = load("gpt2", &device);
    match model.load_adapter(bad.path(), "default") {
        Err(burn_peft::core::PeftError::MissingTensor { key, .. }) => assert_eq!(
            key,
            "base_model.model.transformer.h.1.attn.c_attn.lora_magnitude_vector"
        ),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    assert!(model.adapter_names().is_empty());
}

/// The model and adapter of `dora/ours`: llama_gqa with DoRA on q_proj, v_proj, down_proj and
/// the embedding, trained one AdamW step from a seeded random start.
fn train_ours() -> burn_peft::core::PeftModel<burn_peft::models::HfModel> {
    let device = Device::flex().autodiff();
    device.seed(17);
    let name = "llama_gqa";
    let mut model = load(name, &device);
    let config = dora_config(&["q_proj", "v_proj", "down_proj", "embed_tokens"]);
    model.add_adapter("default", &config).unwrap();
    let (inputs, _) = inputs(name, &device);
    let logits = model.model().forward(&inputs).unwrap().logits.unwrap();
    let loss = logits.powf_scalar(2.0).mean();
    let grads = GradientsParams::from_grads(loss.backward(), model.model());
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init();
    model.update(|m| optim.step(1e-2, m, grads));
    model
}

/// Writes `tests/fixtures/dora/ours/` (our bundle + our logits) for `gen/check_ours.py` to load
/// into PEFT; run by hand when the format changes:
/// `cargo test --test dora_parity -- --ignored write_ours_fixture`.
#[test]
#[ignore = "writes tests/fixtures/dora/ours; run by hand, then gen/check_ours.py"]
fn write_ours_fixture() {
    let mut model = train_ours();
    let out = fixture("dora/ours");
    model.save_adapter(out.join("adapter"), "default").unwrap();
    let active = lm_logits(&model, "llama_gqa");
    model.merge().unwrap();
    let merged = lm_logits(&model, "llama_gqa");
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
/// logits) still loads here to the logits we recorded, active and merged.
#[test]
fn our_committed_bundle_reproduces_our_recorded_outputs() {
    let device = Device::flex();
    let name = "llama_gqa";
    let (_, mask) = inputs(name, &device);
    let ours = fixture("dora/ours");
    let outputs = ours.join("outputs.safetensors");
    let mut model = load(name, &device);
    model.load_adapter(ours.join("adapter"), "default").unwrap();
    let config: &dyn PeftMethod = model.adapter_config("default").unwrap();
    assert_eq!(bundle::method_to_json(config)["use_dora"], true);
    check(
        &lm_logits(&model, name),
        &outputs,
        "logits",
        &mask,
        "ours active",
    );
    model.merge().unwrap();
    check(
        &lm_logits(&model, name),
        &outputs,
        "merged_logits",
        &mask,
        "ours merged",
    );
}
