//! The architecture seam as users meet it: one registry of families, PEFT's default targets per
//! model type, adapters loaded for inference frozen (PEFT's `inference_mode`), and bundles as
//! they come from the Hub (`adapter_model.bin`).

use crate::common;

use std::path::PathBuf;

use burn::tensor::Device;
use burn_peft::core::bundle::{self, TensorFile};
use burn_peft::core::{PeftError, PeftModel};
use burn_peft::ia3::Ia3Config;
use burn_peft::lora::LoraConfig;
use burn_peft::models::{ARCHITECTURES, HfConfig, ModelError};
use common::family::{self, Bundle};
use common::hf::{fixture, inputs, load, logits, model_dir};
use serde_json::{Value, json};

#[test]
fn the_registry_names_every_family_and_an_unknown_type_lists_them() {
    let types: Vec<&str> = ARCHITECTURES
        .iter()
        .flat_map(|a| a.model_types.iter().copied())
        .collect();
    for t in ["bert", "gpt2", "llama", "mistral", "qwen2"] {
        assert!(types.contains(&t), "{t} in {types:?}");
    }
    let err =
        HfConfig::from_value(json!({"model_type": "t5"}), "config.json".as_ref()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture { .. }),
        "{err}"
    );
    let message = err.to_string();
    for t in &types {
        assert!(message.contains(t), "{message}");
    }
    // Every fixture config parses through its family and builds every head it names.
    for name in [
        "bert",
        "bert_cls",
        "gpt2",
        "llama_gqa",
        "llama_cls",
        "qwen2",
        "mistral",
    ] {
        let config = HfConfig::read(&model_dir(name).join("config.json")).unwrap();
        let model = config
            .build(burn_peft::models::Task::Auto, &Device::flex())
            .unwrap();
        assert_eq!(
            Value::String(model.arch().hf_class()),
            config.raw["architectures"][0],
            "{name}"
        );
    }
}

/// PEFT's `TRANSFORMERS_MODELS_TO_{LORA,IA3}_TARGET_MODULES_MAPPING` and the IA3 feedforward
/// mapping (`peft/utils/constants.py`, PEFT 0.21.2) for the fixture families.
/// `(fixture, LoRA targets, IA3 targets, IA3 feedforward)`.
type Defaults = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
);

const PEFT_DEFAULTS: &[Defaults] = &[
    (
        "bert",
        &["query", "value"],
        &["key", "value", "output.dense"],
        &["output.dense"],
    ),
    (
        "gpt2",
        &["c_attn"],
        &["c_attn", "mlp.c_proj"],
        &["mlp.c_proj"],
    ),
    (
        "llama_gqa",
        &["q_proj", "v_proj"],
        &["k_proj", "v_proj", "down_proj"],
        &["down_proj"],
    ),
    (
        "mistral",
        &["q_proj", "v_proj"],
        &["k_proj", "v_proj", "down_proj"],
        &["down_proj"],
    ),
    (
        "qwen2",
        &["q_proj", "v_proj"],
        &["q_proj", "v_proj", "down_proj"],
        &["down_proj"],
    ),
];

#[test]
fn configs_without_targets_take_peft_defaults_for_the_model_type() {
    let device = Device::flex();
    for (name, lora, ia3, feedforward) in PEFT_DEFAULTS {
        let mut model = load(name, &device);
        let report = model.add_adapter("lora", &LoraConfig::default()).unwrap();
        let saved = bundle::method_to_json(model.adapter_config("lora").unwrap());
        assert_eq!(saved["target_modules"], json!(lora), "{name}");
        assert!(!report.adapted.is_empty(), "{name}");
        model.add_adapter("ia3", &Ia3Config::default()).unwrap();
        let saved = bundle::method_to_json(model.adapter_config("ia3").unwrap());
        assert_eq!(saved["target_modules"], json!(ia3), "{name}");
        assert_eq!(saved["feedforward_modules"], json!(feedforward), "{name}");
    }
}

#[test]
fn a_model_without_peft_defaults_asks_for_the_targets() {
    let device = Device::flex();
    let mut model = PeftModel::new(common::Tiny::load(&device));
    match model.add_adapter("default", &LoraConfig::default()) {
        Err(PeftError::InvalidConfig { key, .. }) => assert_eq!(key, "target_modules"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    let ia3 = Ia3Config {
        target_modules: Some(["q_proj"].into()),
        ..Default::default()
    };
    match model.add_adapter("default", &ia3) {
        Err(PeftError::InvalidConfig { key, .. }) => assert_eq!(key, "feedforward_modules"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(model.adapter_names().is_empty(), "nothing was added");
}

#[test]
fn loaded_adapters_are_frozen_unless_asked_to_train() {
    let device = Device::flex();
    let lora = model_dir("llama_gqa").join("lora");
    let mut model = load("llama_gqa", &device);
    model.load_adapter(&lora, "default").unwrap();
    assert_eq!(
        model.trainable_report().trainable,
        0,
        "inference_mode: true"
    );
    assert!(!model.is_adapter_trainable("default"));
    model.set_adapter_trainable("default", true).unwrap();
    let trainable = model.trainable_report().trainable;
    assert!(trainable > 0);

    let mut again = load("llama_gqa", &device);
    again.load_adapter_trainable(&lora, "default").unwrap();
    assert_eq!(again.trainable_report().trainable, trainable);
    again.set_adapter_trainable("default", false).unwrap();
    assert_eq!(again.trainable_report().trainable, 0);

    // A bundle saved with `inference_mode: false` trains when loaded.
    let tmp = tempfile::tempdir().unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("adapter_config.json")).unwrap())
            .unwrap();
    config["inference_mode"] = json!(false);
    std::fs::write(tmp.path().join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::copy(
        lora.join("adapter_model.safetensors"),
        tmp.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut training = load("llama_gqa", &device);
    training.load_adapter(tmp.path(), "default").unwrap();
    assert_eq!(training.trainable_report().trainable, trainable);
}

fn pickle(name: &str) -> PathBuf {
    fixture("pickle").join(name)
}

#[test]
fn an_adapter_model_bin_gives_the_numbers_of_its_safetensors_twin() {
    let device = Device::flex();
    let (batch, _) = inputs("llama_gqa", &device);
    let mut from_bin = load("llama_gqa", &device);
    from_bin
        .load_adapter(pickle("llama_gqa_lora"), "default")
        .unwrap();
    let mut from_safetensors = load("llama_gqa", &device);
    from_safetensors
        .load_adapter(model_dir("llama_gqa").join("lora"), "default")
        .unwrap();
    let a = logits(&from_bin.model().forward(&batch).unwrap());
    let b = logits(&from_safetensors.model().forward(&batch).unwrap());
    assert_eq!(a, b);
    let (file, tensors) = TensorFile::read_bundle_weights(&pickle("llama_gqa_lora")).unwrap();
    assert!(file.ends_with(bundle::PICKLE_WEIGHTS_FILE));
    assert!(tensors.unused_keys().len() > 10);
}

#[test]
fn pickles_holding_anything_but_float_tensors_are_typed_errors() {
    for (name, says) in [
        ("not_tensors.bin", "entry `step`"),
        ("nested.bin", "entry `inner` holds a dictionary"),
        ("code.bin", "not a tensor"),
    ] {
        match TensorFile::read_pickle(&pickle(name)) {
            Err(PeftError::CorruptFile { file, reason }) => {
                assert!(file.ends_with(name));
                assert!(reason.contains(says), "{name}: {reason}");
            }
            other => panic!("{name}: expected CorruptFile, got {:?}", other.err()),
        }
    }
    match TensorFile::read_pickle(&pickle("int_tensor.bin")) {
        Err(PeftError::UnsupportedDtype { key, .. }) => assert_eq!(key, "w"),
        other => panic!("expected UnsupportedDtype, got {:?}", other.err()),
    }
    // Truncated and foreign files.
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(pickle("llama_gqa_lora").join("adapter_model.bin")).unwrap();
    for (file, content) in [
        ("truncated.bin", &bytes[..bytes.len() / 2]),
        ("text.bin", &b"not a pickle at all"[..]),
    ] {
        let path = tmp.path().join(file);
        std::fs::write(&path, content).unwrap();
        assert!(
            matches!(
                TensorFile::read_pickle(&path),
                Err(PeftError::CorruptFile { .. })
            ),
            "{file}"
        );
    }
    // Through a bundle: the error names the file, and the model is left as it was.
    let bundle_dir = tmp.path().join("bundle");
    std::fs::create_dir(&bundle_dir).unwrap();
    std::fs::copy(
        pickle("llama_gqa_lora").join("adapter_config.json"),
        bundle_dir.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::copy(pickle("nested.bin"), bundle_dir.join("adapter_model.bin")).unwrap();
    let mut model = load("llama_gqa", &Device::flex());
    let err = model.load_adapter(&bundle_dir, "default").unwrap_err();
    assert!(err.to_string().contains("adapter_model.bin"), "{err}");
    assert!(model.adapter_names().is_empty());
}

#[test]
fn the_family_harness_checks_the_llama_fixture() {
    let report = family::check("llama_gqa", &[Bundle::Lora]);
    // base, lora, lora merged, lora merged and saved; greedy with and without the adapter.
    assert_eq!(report.diffs.len(), 4, "{report:?}");
    assert_eq!(report.generations, 2);
    family::trains("llama_gqa");
    family::mixed_batch("llama_gqa");
}
