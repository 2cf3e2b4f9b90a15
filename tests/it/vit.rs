//! ViT against transformers + PEFT (`tests/fixtures/gen/vit_tiny.py`): `ViTModel` (encoder
//! outputs, pooler) and `ViTForImageClassification` (logits), each bundle (LoRA, LoRA on the
//! patch convolution with `modules_to_save`, DoRA) active, merged, unmerged, saved and reloaded;
//! merged models through `save_pretrained`; a mixed-adapter batch; the checkpoint names of both
//! transformers generations; typed errors for images the model cannot read.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use burn_peft::core::{PeftError, PeftModel};
use burn_peft::models::{
    HfModel, ModelError, ModelInputs, ModelOutputs, Task, from_pretrained, save_pretrained,
};
use burn_peft::prefix::PrefixTuningConfig;

use crate::common::hf::{max_rel_diff, model_dir, read_all};

const TOL: f32 = 1e-5;
const BUNDLES: [&str; 3] = ["lora", "lora_conv", "dora"];

fn pixels(name: &str, device: &Device) -> Tensor<4> {
    let (values, shape) = read_all(&model_dir(name).join("inputs.safetensors"))
        .remove("pixel_values")
        .unwrap();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn inputs(name: &str, device: &Device) -> ModelInputs {
    ModelInputs::images(pixels(name, device))
}

fn load_from(dir: &Path, device: &Device) -> PeftModel<HfModel> {
    let pretrained = from_pretrained(dir.to_str().unwrap(), Task::Auto, device)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    PeftModel::new(pretrained.model)
}

fn values<const D: usize>(t: &Option<Tensor<D>>) -> Vec<f32> {
    t.clone().unwrap().into_data().try_to_vec::<f32>().unwrap()
}

/// The outputs transformers names, by their names in `expected.safetensors`.
fn named(out: &ModelOutputs) -> Vec<(&'static str, Vec<f32>)> {
    if out.class_logits.is_some() {
        return vec![("logits", values(&out.class_logits))];
    }
    vec![
        ("last_hidden_state", values(&out.last_hidden_state)),
        ("pooler_output", values(&out.pooler_output)),
    ]
}

/// The largest difference of the outputs from `<prefix><output>` of `expected`.
fn compare(model: &HfModel, inputs: &ModelInputs, expected: &Path, prefix: &str) -> f32 {
    let mut theirs = read_all(expected);
    let out = model.forward(inputs).unwrap();
    let mut worst = 0.0f32;
    for (key, ours) in named(&out) {
        let key = format!("{prefix}{key}");
        let (want, _) = theirs
            .remove(&key)
            .unwrap_or_else(|| panic!("{key} in {}", expected.display()));
        let diff = max_rel_diff(&ours, &want);
        assert!(
            diff < TOL,
            "{}: `{key}` differs from transformers + PEFT by {diff}",
            expected.display()
        );
        worst = worst.max(diff);
    }
    worst
}

/// Save `merged` with `save_pretrained` (the names transformers writes), load it again and
/// compare with `merged_*`.
fn saved_and_reloaded(name: &str, merged: &HfModel, inputs: &ModelInputs, expected: &Path) -> f32 {
    let device = Device::flex();
    let source = from_pretrained(model_dir(name).to_str().unwrap(), Task::Auto, &device).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let saved = save_pretrained(merged, &source.config, &source.dir, &out, None).unwrap();
    assert_eq!(
        serde_json::Value::String(saved.architecture),
        source.config.raw["architectures"][0]
    );
    let names: Vec<String> = read_all(&out.join("model.safetensors"))
        .into_keys()
        .collect();
    let theirs: Vec<String> = read_all(&model_dir(name).join("model.safetensors"))
        .into_keys()
        .collect();
    assert_eq!(names, theirs, "{name}: saved tensor names");
    let reloaded = load_from(&out, &device);
    compare(reloaded.model(), inputs, expected, "merged_")
}

fn check(name: &str) -> Vec<(String, f32)> {
    let device = Device::flex();
    let dir = model_dir(name);
    let inputs = inputs(name, &device);
    let mut report = Vec::new();
    let base = load_from(&dir, &device);
    report.push((
        "base".to_string(),
        compare(base.model(), &inputs, &dir.join("expected.safetensors"), ""),
    ));
    for bundle in BUNDLES {
        let folder = dir.join(bundle);
        let expected = folder.join("expected.safetensors");
        let mut model = load_from(&dir, &device);
        model
            .load_adapter(&folder, "default")
            .unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
        report.push((
            bundle.into(),
            compare(model.model(), &inputs, &expected, ""),
        ));

        // Saved and loaded again: the same outputs.
        let tmp = tempfile::tempdir().unwrap();
        model.save_adapter(tmp.path(), "default").unwrap();
        let mut again = load_from(&dir, &device);
        again.load_adapter(tmp.path(), "default").unwrap();
        let diff = compare(again.model(), &inputs, &expected, "");
        report.push((format!("{bundle} resaved"), diff));

        model.merge().unwrap();
        let diff = compare(model.model(), &inputs, &expected, "merged_");
        report.push((format!("{bundle} merged"), diff));
        model.unmerge().unwrap();
        let diff = compare(model.model(), &inputs, &expected, "");
        report.push((format!("{bundle} unmerged"), diff));
        let merged = model.merge_and_unload().unwrap();
        let diff = saved_and_reloaded(name, &merged, &inputs, &expected);
        report.push((format!("{bundle} saved"), diff));
    }
    eprintln!("{name}: {report:?}");
    report
}

#[test]
fn vit_encoder_matches_transformers_and_peft() {
    let report = check("vit");
    assert_eq!(report.len(), 1 + 5 * BUNDLES.len());
}

#[test]
fn vit_image_classifier_matches_transformers_and_peft() {
    let device = Device::flex();
    check("vit_cls");
    let model = load_from(&model_dir("vit_cls"), &device);
    assert_eq!(
        model.model().task(),
        Task::SequenceClassification { num_labels: 3 }
    );
    assert_eq!(model.model().vocab_size(), 0);
    assert_eq!(model.model().num_layers(), 2);
}

/// transformers 5's module names (`layers.N.attention.q_proj`, `mlp.fc1`) load as the Hub
/// names (`encoder.layer.N.attention.attention.query`, `intermediate.dense`) of the fixture do.
#[test]
fn vit_loads_transformers_5_names() {
    let device = Device::flex();
    for name in ["vit", "vit_cls"] {
        let dir = model_dir(name);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
        let renames = [
            ("encoder.layer.", "layers."),
            (".attention.attention.query.", ".attention.q_proj."),
            (".attention.attention.key.", ".attention.k_proj."),
            (".attention.attention.value.", ".attention.v_proj."),
            (".attention.output.dense.", ".attention.o_proj."),
            (".intermediate.dense.", ".mlp.fc1."),
            (".output.dense.", ".mlp.fc2."),
        ];
        let tensors: Vec<(String, Vec<u8>, Vec<usize>)> = read_all(&dir.join("model.safetensors"))
            .into_iter()
            .map(|(k, (v, s))| {
                let k = renames.iter().fold(k, |k, (a, b)| k.replace(a, b));
                let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (k, bytes, s)
            })
            .collect();
        assert!(tensors.iter().any(|(k, ..)| k.contains(".mlp.fc2.")));
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(k, v, s)| {
                (
                    k.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), v)
                        .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
        let model = load_from(tmp.path(), &device);
        compare(
            model.model(),
            &inputs(name, &device),
            &dir.join("expected.safetensors"),
            "",
        );
    }
}

/// PEFT's `adapter_names`: image 0 with LoRA on the patch convolution, image 1 with DoRA,
/// in one batch, equal each image run alone with its adapter.
#[test]
fn vit_mixed_adapter_batch_equals_single_rows() {
    let device = Device::flex();
    for name in ["vit", "vit_cls"] {
        let dir = model_dir(name);
        let batch = inputs(name, &device);
        let mut model = load_from(&dir, &device);
        model.load_adapter(dir.join("lora_conv"), "a").unwrap();
        model.load_adapter(dir.join("dora"), "b").unwrap();
        let names = ["a", "b"];
        let ctx = model.adapter_rows(&names, &device).unwrap();
        let mixed = named(&model.model().forward_with(&batch, &ctx).unwrap());
        for (row, adapter) in names.iter().enumerate() {
            model.set_adapter(adapter).unwrap();
            let alone = named(&model.model().forward(&batch).unwrap());
            for ((key, m), (_, a)) in mixed.iter().zip(&alone) {
                let per_row = m.len() / names.len();
                let range = row * per_row..(row + 1) * per_row;
                let diff = max_rel_diff(&m[range.clone()], &a[range]);
                assert!(
                    diff < TOL,
                    "{name}: {key} row {row} ({adapter}) differs by {diff}"
                );
            }
        }
    }
}

/// Images the model cannot read are typed errors, never panics.
#[test]
fn vit_refuses_images_it_cannot_read() {
    let device = Device::flex();
    let model = load_from(&model_dir("vit_cls"), &device);
    let cases = [
        (Tensor::<4>::zeros([1, 1, 16, 16], &device), "channels"),
        (Tensor::<4>::zeros([1, 3, 32, 32], &device), "image_size"),
        (Tensor::<4>::zeros([1, 3, 16, 8], &device), "image_size"),
        (Tensor::<4>::zeros([0, 3, 16, 16], &device), "non-empty"),
    ];
    for (pixels, what) in cases {
        let err = model
            .model()
            .forward(&ModelInputs::images(pixels))
            .unwrap_err();
        assert!(
            matches!(err, ModelError::InputOutOfRange { .. }) && err.to_string().contains(what),
            "{what}: {err}"
        );
    }
    // Token ids without images.
    let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::zeros([1, 4], &device);
    let err = model
        .model()
        .forward(&ModelInputs {
            input_ids: ids,
            attention_mask: None,
            token_type_ids: None,
            pixel_values: None,
        })
        .unwrap_err();
    assert!(matches!(err, ModelError::InputOutOfRange { .. }), "{err}");
}

/// transformers' ViT takes no past keys and values, and PEFT 0.21.2's prefix tuning fails on it
/// (`ViTConfig` has no `vocab_size`): adding prefix tuning is a typed refusal.
#[test]
fn vit_refuses_prefix_tuning() {
    let device = Device::flex();
    let mut model = load_from(&model_dir("vit"), &device);
    let err = model
        .add_adapter(
            "p",
            &PrefixTuningConfig {
                num_virtual_tokens: 4,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, PeftError::UnsupportedSite { .. }), "{err}");
    assert_eq!(model.model().prefix_len(), 0);
}
