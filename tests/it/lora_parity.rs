//! LoRA parity with Hugging Face PEFT 0.21.2 on the tiny model of
//! `tests/fixtures/gen/lora_tiny.py`: outputs, trainable counts, and the bundle we write.

use std::collections::BTreeMap;

use crate::common::{Tiny, expected, fixtures, input_ids, max_diff, values};
use burn::tensor::Device;
use burn_peft::core::bundle::{self, TensorFile};
use burn_peft::core::{PeftModel, TargetModules};
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use serde_json::Value;

/// Parity tolerance against PEFT's float32 outputs (relative above magnitude 1, see `max_diff`).
const TOL: f32 = 1e-5;

fn loaded_main(device: &Device) -> PeftModel<Tiny> {
    let mut model = PeftModel::new(Tiny::load(device));
    model
        .load_adapter_trainable(fixtures().join("main"), "default")
        .unwrap();
    model
}

#[test]
fn base_model_matches_torch() {
    let device = Device::flex();
    let model = Tiny::load(&device);
    let out = values(model.forward(input_ids(&device)));
    let diff = max_diff(&out, &expected("base_expected.safetensors", "logits"));
    assert!(diff < TOL, "base output differs from torch by {diff}");
}

#[test]
fn peft_bundle_active_merged_disabled_match_peft() {
    let device = Device::flex();
    let ids = input_ids(&device);
    let mut model = loaded_main(&device);

    let active = values(model.model().forward(ids.clone()));
    let diff = max_diff(&active, &expected("main/expected.safetensors", "active"));
    assert!(diff < TOL, "active adapter differs from PEFT by {diff}");

    model.merge().unwrap();
    let merged = values(model.model().forward(ids.clone()));
    let diff = max_diff(&merged, &expected("main/expected.safetensors", "merged"));
    assert!(diff < TOL, "merged adapter differs from PEFT by {diff}");

    model.unmerge().unwrap();
    let unmerged = values(model.model().forward(ids.clone()));
    assert!(
        max_diff(&unmerged, &active) < TOL,
        "unmerge does not restore the weights"
    );

    model.disable_adapters().unwrap();
    let disabled = values(model.model().forward(ids.clone()));
    let diff = max_diff(
        &disabled,
        &expected("main/expected.safetensors", "disabled"),
    );
    assert!(diff < TOL, "disabled adapters differ from PEFT by {diff}");

    model.enable_adapters().unwrap();
    let again = values(model.model().forward(ids.clone()));
    // Merge then unmerge leaves float rounding in the base weights (as in PEFT), hence no `==`.
    assert!(
        max_diff(&again, &active) < TOL,
        "enable after disable must restore the adapted output"
    );

    let plain = model.merge_and_unload().unwrap();
    let unloaded = values(plain.forward(ids));
    let diff = max_diff(&unloaded, &expected("main/expected.safetensors", "merged"));
    assert!(diff < TOL, "merge_and_unload differs from PEFT by {diff}");
}

#[test]
fn trainable_report_equals_print_trainable_parameters() {
    let device = Device::flex();
    let model = loaded_main(&device);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("main/trainable.json")).unwrap(),
    )
    .unwrap();
    let report = model.trainable_report();
    assert_eq!(
        report.trainable as u64,
        reference["trainable_params"].as_u64().unwrap()
    );
    assert_eq!(report.all as u64, reference["all_params"].as_u64().unwrap());
    assert_eq!(
        report.to_string(),
        reference["print_trainable_parameters"].as_str().unwrap()
    );
}

#[test]
fn two_adapters_switch_combine_and_disable_like_peft() {
    let device = Device::flex();
    let ids = input_ids(&device);
    let mut model = PeftModel::new(Tiny::load(&device));
    model
        .load_adapter_trainable(fixtures().join("multi"), "default")
        .unwrap();
    model
        .load_adapter_trainable(fixtures().join("multi/second"), "second")
        .unwrap();
    assert_eq!(model.active_adapters(), ["default"]);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("multi/trainable.json")).unwrap(),
    )
    .unwrap();
    let file = "multi/expected.safetensors";

    let out = values(model.model().forward(ids.clone()));
    assert!(max_diff(&out, &expected(file, "default_only")) < TOL);
    let line = model.trainable_report().to_string();
    assert_eq!(
        Some(line.as_str()),
        find_line(&reference, "after_add_adapter"),
        "default active"
    );

    model.set_adapter("second").unwrap();
    let out = values(model.model().forward(ids.clone()));
    assert!(max_diff(&out, &expected(file, "second_only")) < TOL);
    let line = model.trainable_report().to_string();
    assert_eq!(
        Some(line.as_str()),
        find_line(&reference, "second_active"),
        "second active"
    );

    model.set_adapters(&["default", "second"]).unwrap();
    let out = values(model.model().forward(ids.clone()));
    let diff = max_diff(&out, &expected(file, "both"));
    assert!(diff < TOL, "two active adapters differ from PEFT by {diff}");

    model.merge().unwrap();
    let merged = values(model.model().forward(ids.clone()));
    assert!(max_diff(&merged, &expected(file, "both")) < 1e-4);
    model.set_adapter("default").unwrap(); // unmerges first, as PEFT does
    let out = values(model.model().forward(ids.clone()));
    assert!(max_diff(&out, &expected(file, "default_only")) < TOL);

    model.disable_adapters().unwrap();
    let out = values(model.model().forward(ids.clone()));
    assert!(max_diff(&out, &expected(file, "disabled")) < TOL);
    model.enable_adapters().unwrap();

    model.delete_adapter("default").unwrap();
    assert_eq!(model.adapter_names(), ["second"]);
    assert_eq!(model.active_adapters(), ["second"]);
    let out = values(model.model().forward(ids));
    assert!(max_diff(&out, &expected(file, "second_only")) < TOL);
}

/// A trainable line PEFT printed, from `multi/trainable.json`.
fn find_line<'a>(reference: &'a Value, case: &str) -> Option<&'a str> {
    reference[case]["print_trainable_parameters"].as_str()
}

#[test]
fn bias_lora_only_trains_targeted_biases_like_peft() {
    let device = Device::flex();
    let mut model = PeftModel::new(Tiny::load(&device));
    model
        .load_adapter_trainable(fixtures().join("multi/second"), "second")
        .unwrap();
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("multi/trainable.json")).unwrap(),
    )
    .unwrap();
    let line = model.trainable_report().to_string();
    assert_eq!(
        Some(line.as_str()),
        find_line(&reference, "second_as_only_adapter")
    );
}

fn case_a_config() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some(TargetModules::list([
            "q_proj",
            "v_proj",
            "down_proj",
            "embed_tokens",
        ])),
        init_lora_weights: InitLoraWeights::Bool(false),
        use_rslora: true,
        rank_pattern: [("layers.1.attn.v_proj".to_string(), 2)]
            .into_iter()
            .collect(),
        alpha_pattern: [("down_proj".to_string(), 16.0)].into_iter().collect(),
        modules_to_save: Some(vec!["classifier".into()]),
        ..Default::default()
    }
}

fn shapes(path: &std::path::Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect()
}

fn metadata(path: &std::path::Path) -> Option<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone()
}

/// Config values that must equal PEFT's; `target_modules` is a set in PEFT (arbitrary order),
/// and `auto_mapping` / `peft_version` describe the writer, not the adapter.
fn comparable(mut config: Value) -> Value {
    let map = config.as_object_mut().unwrap();
    map.remove("auto_mapping");
    map.remove("peft_version");
    if let Some(Value::Array(targets)) = map.get_mut("target_modules") {
        targets.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
    config
}

#[test]
fn bundle_we_write_has_peft_keys_shapes_and_config() {
    let device = Device::flex();
    let mut model = PeftModel::new(Tiny::load(&device));
    model.add_adapter("default", &case_a_config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), "default").unwrap();

    let ours = shapes(&dir.path().join(bundle::WEIGHTS_FILE));
    let peft = shapes(&fixtures().join("main").join(bundle::WEIGHTS_FILE));
    assert_eq!(ours, peft, "tensor names and shapes differ from PEFT's");
    assert_eq!(
        metadata(&dir.path().join(bundle::WEIGHTS_FILE)),
        Some(
            [("format".to_string(), "pt".to_string())]
                .into_iter()
                .collect()
        )
    );

    let read = |p: std::path::PathBuf| -> (String, Value) {
        let text = std::fs::read_to_string(p).unwrap();
        let value = serde_json::from_str(&text).unwrap();
        (text, value)
    };
    let (our_text, our_config) = read(dir.path().join(bundle::CONFIG_FILE));
    let (_, peft_config) = read(fixtures().join("main").join(bundle::CONFIG_FILE));
    assert_eq!(comparable(our_config.clone()), comparable(peft_config));
    // Sorted keys, indent 2, as `json.dump(indent=2, sort_keys=True)`.
    assert!(our_text.starts_with("{\n  \"alora_invocation_tokens\": null,\n"));
    let keys: Vec<&String> = our_config.as_object().unwrap().keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[test]
fn bundle_we_write_reloads_to_the_same_outputs() {
    let device = Device::flex();
    let ids = input_ids(&device);
    let model = loaded_main(&device);
    let before = values(model.model().forward(ids.clone()));
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), "default").unwrap();
    // The tensors are exactly PEFT's.
    let mut ours = TensorFile::read(&dir.path().join(bundle::WEIGHTS_FILE)).unwrap();
    let mut theirs = TensorFile::read(&fixtures().join("main").join(bundle::WEIGHTS_FILE)).unwrap();
    for (key, shape) in shapes(&fixtures().join("main").join(bundle::WEIGHTS_FILE)) {
        assert_eq!(
            ours.take(&key, &shape)
                .unwrap()
                .try_to_vec::<f32>()
                .unwrap(),
            theirs
                .take(&key, &shape)
                .unwrap()
                .try_to_vec::<f32>()
                .unwrap(),
            "{key}"
        );
    }

    let mut reloaded = PeftModel::new(Tiny::load(&device));
    reloaded.load_adapter(dir.path(), "default").unwrap();
    let after = values(reloaded.model().forward(ids));
    assert_eq!(before, after);
}

#[test]
fn non_default_adapters_are_saved_in_a_subfolder() {
    let device = Device::flex();
    let mut model = PeftModel::new(Tiny::load(&device));
    model
        .load_adapter(fixtures().join("multi"), "default")
        .unwrap();
    model
        .load_adapter(fixtures().join("multi/second"), "second")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), "default").unwrap();
    model.save_adapter(dir.path(), "second").unwrap();
    for (ours, theirs) in [
        (dir.path().to_path_buf(), fixtures().join("multi")),
        (dir.path().join("second"), fixtures().join("multi/second")),
    ] {
        assert_eq!(
            shapes(&ours.join(bundle::WEIGHTS_FILE)),
            shapes(&theirs.join(bundle::WEIGHTS_FILE)),
            "{}",
            ours.display()
        );
    }
}
