//! Bad bundles and configs give typed errors naming the file and key, never a panic, and leave
//! the model and previous bundles untouched.

use std::path::{Path, PathBuf};

use crate::common::{Tiny, fixtures, input_ids, values};
use burn::tensor::Device;
use burn_peft::core::bundle::{self, CONFIG_FILE, TensorFile, WEIGHTS_FILE};
use burn_peft::core::{PeftError, PeftModel, TargetModules};
use burn_peft::lora::LoraConfig;
use serde_json::Value;

/// A writable copy of the PEFT bundle `main`.
fn bundle_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle");
    std::fs::create_dir(&path).unwrap();
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        std::fs::copy(fixtures().join("main").join(file), path.join(file)).unwrap();
    }
    (dir, path)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let file = dir.join(CONFIG_FILE);
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    edit(value.as_object_mut().unwrap());
    std::fs::write(file, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// Rewrite the weights file through `edit` on (key -> data).
fn edit_weights(
    dir: &Path,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, burn::tensor::TensorData>),
) {
    let file = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut reader = TensorFile::read(&file).unwrap();
    let mut tensors: std::collections::BTreeMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = reader.take(&k, v.shape()).unwrap();
            (k, data)
        })
        .collect();
    edit(&mut tensors);
    std::fs::write(&file, bundle::encode_safetensors(&tensors).unwrap()).unwrap();
}

/// Load `dir` into a fresh model; on error, check the model is unchanged.
fn load(dir: &Path) -> Result<PeftModel<Tiny>, PeftError> {
    let device = Device::flex();
    let mut model = PeftModel::new(Tiny::load(&device));
    let before = values(model.model().forward(input_ids(&device)));
    match model.load_adapter(dir, "default") {
        Ok(_) => Ok(model),
        Err(e) => {
            assert!(
                model.adapter_names().is_empty(),
                "a failed load must not leave an adapter"
            );
            assert_eq!(model.trainable_report().trainable, 0);
            let after = values(model.model().forward(input_ids(&device)));
            assert_eq!(before, after, "a failed load must not change the model");
            Err(e)
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = bundle_copy();
    let key = "base_model.model.layers.1.attn.q_proj.lora_B.weight";
    edit_weights(&dir, |t| {
        t.remove(key);
    });
    match load(&dir) {
        Err(PeftError::MissingTensor { file, key: k }) => {
            assert_eq!(k, key);
            assert_eq!(file, dir.join(WEIGHTS_FILE));
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    let (_tmp, dir) = bundle_copy();
    let key = "base_model.model.layers.0.attn.k_proj.lora_A.weight";
    edit_weights(&dir, |t| {
        t.insert(
            key.into(),
            burn::tensor::TensorData::new(vec![0f32; 64], [4, 16]),
        );
    });
    let err = load(&dir).unwrap_err();
    assert!(
        matches!(&err, PeftError::UnexpectedTensor { key: k, .. } if k == key),
        "{err:?}"
    );
    assert!(err.to_string().contains(key));
}

#[test]
fn shape_mismatch_says_expected_and_found() {
    let (_tmp, dir) = bundle_copy();
    edit_config(&dir, |c| {
        c.insert("r".into(), Value::from(3));
    });
    match load(&dir) {
        Err(PeftError::ShapeMismatch {
            expected, found, ..
        }) => {
            assert_eq!(expected[0], 3);
            assert_eq!(found[0], 4);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn truncated_and_garbage_files_are_corrupt() {
    let (_tmp, dir) = bundle_copy();
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(load(&dir), Err(PeftError::CorruptFile { file, .. }) if file == weights));

    std::fs::write(&weights, b"not a safetensors file").unwrap();
    assert!(matches!(load(&dir), Err(PeftError::CorruptFile { .. })));

    let (_tmp2, dir2) = bundle_copy();
    std::fs::write(dir2.join(CONFIG_FILE), "{ \"peft_type\": \"LORA\", ").unwrap();
    assert!(
        matches!(load(&dir2), Err(PeftError::CorruptFile { file, .. }) if file == dir2.join(CONFIG_FILE))
    );
}

#[test]
fn missing_files_are_io_errors_naming_the_file() {
    let (_tmp, dir) = bundle_copy();
    std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    assert!(
        matches!(load(&dir), Err(PeftError::Io { file, .. }) if file == dir.join(WEIGHTS_FILE))
    );
}

#[test]
fn unknown_peft_type_lists_registered_methods() {
    let (_tmp, dir) = bundle_copy();
    edit_config(&dir, |c| {
        c.insert("peft_type".into(), Value::from("LORRA"));
    });
    match load(&dir) {
        Err(PeftError::UnknownPeftType {
            found,
            registered,
            file,
        }) => {
            assert_eq!(found, "LORRA");
            assert!(registered.contains(&"LORA".to_string()));
            assert_eq!(file, Some(dir.join(CONFIG_FILE)));
        }
        other => panic!("expected UnknownPeftType, got {other:?}"),
    }
}

#[test]
fn math_changing_options_are_refused_with_their_key() {
    // (`use_dora` is implemented: a DoRA config on a bundle without magnitudes is a missing
    // tensor, tests/dora_parity.rs.)
    for (key, value) in [
        ("lora_bias", Value::Bool(true)),
        ("target_parameters", serde_json::json!(["experts.weight"])),
        ("layer_replication", serde_json::json!([[0, 2]])),
        ("init_lora_weights", Value::from("pissa")),
        ("use_qalora", Value::Bool(true)),
    ] {
        let (_tmp, dir) = bundle_copy();
        edit_config(&dir, |c| {
            c.insert(key.into(), value.clone());
        });
        match load(&dir) {
            Err(PeftError::Unsupported { key: k, file, .. }) => {
                assert_eq!(k, key);
                assert_eq!(file, Some(dir.join(CONFIG_FILE)));
            }
            other => panic!("{key}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn wrongly_typed_values_are_invalid_config() {
    let (_tmp, dir) = bundle_copy();
    edit_config(&dir, |c| {
        c.insert("r".into(), Value::from("four"));
    });
    let err = load(&dir).unwrap_err();
    assert!(matches!(err, PeftError::InvalidConfig { .. }), "{err:?}");
    assert!(err.to_string().contains(CONFIG_FILE));
}

#[test]
fn unknown_harmless_keys_are_warnings() {
    let (_tmp, dir) = bundle_copy();
    edit_config(&dir, |c| {
        c.insert("some_future_option".into(), Value::from(1));
    });
    let device = Device::flex();
    let mut model = PeftModel::new(Tiny::load(&device));
    let report = model.load_adapter(&dir, "default").unwrap();
    assert_eq!(report.unknown_config_keys, ["some_future_option"]);
}

#[test]
fn target_that_matches_nothing_names_the_closest_modules() {
    let device = Device::flex();
    let mut model = PeftModel::new(Tiny::load(&device));
    let config = LoraConfig {
        target_modules: Some(TargetModules::list(["q_proj", "dwn_proj"])),
        ..Default::default()
    };
    match model.add_adapter("default", &config) {
        Err(PeftError::TargetNotFound { entry, closest, .. }) => {
            assert_eq!(entry, "dwn_proj");
            assert_eq!(closest.first().map(String::as_str), Some("down_proj"));
        }
        other => panic!("expected TargetNotFound, got {other:?}"),
    }
    assert!(model.adapter_names().is_empty());
}

#[test]
fn duplicate_and_unknown_adapter_names_are_errors() {
    let device = Device::flex();
    let mut model = PeftModel::new(Tiny::load(&device));
    model
        .load_adapter(fixtures().join("main"), "default")
        .unwrap();
    assert!(matches!(
        model.load_adapter(fixtures().join("main"), "default"),
        Err(PeftError::AdapterExists(_))
    ));
    assert!(matches!(
        model.set_adapter("nope"),
        Err(PeftError::AdapterNotFound { .. })
    ));
    assert!(matches!(
        model.delete_adapter("nope"),
        Err(PeftError::AdapterNotFound { .. })
    ));
    assert!(matches!(
        model.save_adapter("unused", "nope"),
        Err(PeftError::AdapterNotFound { .. })
    ));
}

#[test]
fn invalid_adapter_names_are_rejected() {
    let device = Device::flex();
    let mut model = PeftModel::new(Tiny::load(&device));
    let config = LoraConfig {
        target_modules: Some(TargetModules::list(["q_proj"])),
        ..Default::default()
    };
    for name in ["", "../escape", "a.b"] {
        assert!(matches!(
            model.add_adapter(name, &config),
            Err(PeftError::InvalidConfig { .. })
        ));
    }
}
