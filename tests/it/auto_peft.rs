//! `AutoPeftModel::from_pretrained`: the base a bundle names, loaded with the bundle in one call
//! (PEFT's `AutoPeftModelForCausalLM`), gives the same model as loading both by hand.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor};
use burn_peft::core::PeftModel;
use burn_peft::models::{AutoPeftModel, HfModel, ModelInputs, Task, from_pretrained};

fn fixture(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// The Python PEFT bundle of the tiny Llama, copied with `base_model_name_or_path` set to `base`.
fn bundle_naming(base: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("models/llama_gqa/lora");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let file = dir.path().join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    config["base_model_name_or_path"] = base;
    std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    dir
}

fn logits(model: &PeftModel<HfModel>, device: &Device) -> Vec<f32> {
    let input_ids = Tensor::<2, Int>::from_data([[1, 5, 9, 3, 7, 2]], device);
    let inputs = ModelInputs {
        input_ids,
        attention_mask: None,
        token_type_ids: None,
        pixel_values: None,
    };
    let out = model.model().forward(&inputs).unwrap();
    out.logits.unwrap().into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_bundle_loads_with_the_base_it_names() {
    let device = Device::flex();
    let base_dir = fixture("models/llama_gqa");
    let bundle = bundle_naming(base_dir.to_string_lossy().into());

    // `task_type: CAUSAL_LM` picks the LM head under `Task::Auto`.
    let auto = AutoPeftModel::from_pretrained(bundle.path(), Task::Auto, &device, false).unwrap();
    assert_eq!(auto.model.adapter_names(), ["default"]);
    assert_eq!(auto.model.trainable_report().trainable, 0);
    assert_eq!(auto.base_dir, base_dir);

    let base = from_pretrained(base_dir.to_str().unwrap(), Task::CausalLm, &device).unwrap();
    let by_hand = PeftModel::from_pretrained(base.model, bundle.path(), false).unwrap();
    let (a, b) = (logits(&auto.model, &device), logits(&by_hand, &device));
    assert_eq!(a, b);
    // The adapter is in effect: the base alone differs.
    let plain = from_pretrained(base_dir.to_str().unwrap(), Task::CausalLm, &device).unwrap();
    assert_ne!(a, logits(&PeftModel::new(plain.model), &device));

    // `is_trainable=True`.
    let trainable =
        AutoPeftModel::from_pretrained(bundle.path(), Task::Auto, &device, true).unwrap();
    assert!(trainable.model.trainable_report().trainable > 0);
}

#[test]
fn a_bundle_without_a_base_name_says_what_to_do() {
    let device = Device::flex();
    let bundle = bundle_naming(serde_json::Value::Null);
    let err = AutoPeftModel::from_pretrained(bundle.path(), Task::Auto, &device, false)
        .err()
        .expect("no base to load");
    let text = err.to_string();
    assert!(text.contains("base_model_name_or_path"), "{text}");
    assert!(text.contains("PeftModel::from_pretrained"), "{text}");

    let missing = AutoPeftModel::from_pretrained("no/such/bundle", Task::Auto, &device, false);
    assert!(
        missing
            .err()
            .unwrap()
            .to_string()
            .contains("adapter_config.json")
    );
}
