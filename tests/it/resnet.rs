//! ResNet against transformers + PEFT (`tests/fixtures/gen/resnet_tiny.py`): the bottleneck
//! `ResNetModel` (pooled features) and the basic `ResNetForImageClassification`, eval mode
//! (BatchNorm with the checkpoint's running statistics). Each PEFT bundle (LoRA on every
//! convolution, with `modules_to_save = ["classifier.1"]` on the classifier; DoRA on every
//! convolution) active, merged, unmerged, saved and reloaded; the merged model through
//! `save_pretrained`; a mixed-adapter batch; bad images and prefix tuning refused.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use burn_peft::core::{PeftError, PeftModel};
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use burn_peft::models::{
    HfModel, ModelError, ModelInputs, ModelOutputs, Task, from_pretrained, save_pretrained,
};
use burn_peft::prefix::PrefixTuningConfig;

use crate::common::hf::{max_rel_diff, model_dir, read_all};

/// Parity tolerance against transformers' float32 outputs.
const TOL: f32 = 1e-5;

/// The fixture's output key: the encoder's pooled features or the classifier's logits.
fn key(name: &str) -> &'static str {
    if name.ends_with("_cls") {
        "logits"
    } else {
        "pooler_output"
    }
}

fn images(name: &str, device: &Device) -> ModelInputs {
    let (values, shape) = read_all(&model_dir(name).join("inputs.safetensors"))
        .remove("pixel_values")
        .expect("pixel_values");
    ModelInputs::images(Tensor::from_data(TensorData::new(values, shape), device))
}

fn values(out: &ModelOutputs) -> Vec<f32> {
    let t = out
        .class_logits
        .clone()
        .or_else(|| out.pooler_output.clone())
        .expect("logits or pooled features");
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn run(model: &HfModel, inputs: &ModelInputs) -> Vec<f32> {
    values(&model.forward(inputs).unwrap())
}

fn base(name: &str, device: &Device) -> PeftModel<HfModel> {
    let pretrained = from_pretrained(model_dir(name).to_str().unwrap(), Task::Auto, device)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    PeftModel::new(pretrained.model)
}

/// Compare `ours` with tensor `key` of `expected`, within [`TOL`]; returns the difference.
fn close(ours: &[f32], expected: &Path, key: &str) -> f32 {
    let theirs = read_all(expected)
        .remove(key)
        .unwrap_or_else(|| panic!("{key} in {}", expected.display()))
        .0;
    let diff = max_rel_diff(ours, &theirs);
    assert!(
        diff < TOL,
        "{}: `{key}` differs from transformers + PEFT by {diff}",
        expected.display()
    );
    diff
}

/// Base, each bundle (active, merged, unmerged, saved and reloaded as a bundle, merged and
/// saved as a model), all against transformers + PEFT.
fn check(name: &str) {
    let device = Device::flex();
    let inputs = images(name, &device);
    let dir = model_dir(name);
    let k = key(name);
    let model = base(name, &device);
    let mut diffs = vec![(
        "base".to_string(),
        close(
            &run(model.model(), &inputs),
            &dir.join("expected.safetensors"),
            k,
        ),
    )];
    let merged_key = format!("merged_{k}");
    for bundle in ["lora", "dora"] {
        let folder = dir.join(bundle);
        let expected = folder.join("expected.safetensors");
        let mut model = base(name, &device);
        model
            .load_adapter(&folder, "default")
            .unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
        let active = run(model.model(), &inputs);
        diffs.push((bundle.into(), close(&active, &expected, k)));

        // Saved as a bundle and loaded again: the same outputs.
        let tmp = tempfile::tempdir().unwrap();
        model.save_adapter(tmp.path(), "default").unwrap();
        let mut again = base(name, &device);
        again.load_adapter(tmp.path(), "default").unwrap();
        let reloaded = run(again.model(), &inputs);
        assert!(
            max_rel_diff(&reloaded, &active) < 1e-6,
            "{name}/{bundle}: save_adapter + load_adapter"
        );

        model.merge().unwrap();
        let merged = run(model.model(), &inputs);
        diffs.push((
            format!("{bundle} merged"),
            close(&merged, &expected, &merged_key),
        ));
        model.unmerge().unwrap();
        let unmerged = run(model.model(), &inputs);
        diffs.push((format!("{bundle} unmerged"), close(&unmerged, &expected, k)));

        // The merged model through save_pretrained, loaded again as transformers would.
        let merged = model.merge_and_unload().unwrap();
        let source = from_pretrained(dir.to_str().unwrap(), Task::Auto, &device).unwrap();
        let out = tmp.path().join("merged");
        let saved = save_pretrained(&merged, &source.config, &source.dir, &out, None).unwrap();
        assert_eq!(
            serde_json::Value::String(saved.architecture),
            source.config.raw["architectures"][0],
            "{name}: the saved class"
        );
        let reloaded = from_pretrained(out.to_str().unwrap(), Task::Auto, &device).unwrap();
        let diff = close(&run(&reloaded.model, &inputs), &expected, &merged_key);
        diffs.push((format!("{bundle} saved"), diff));
    }
    eprintln!("{name}: {diffs:?}");
}

#[test]
fn resnet_bottleneck_encoder_matches_transformers_and_peft() {
    check("resnet");
}

#[test]
fn resnet_basic_classifier_matches_transformers_and_peft() {
    check("resnet_cls");
}

/// Two images, two adapters (the fixture's LoRA and a second random LoRA on the
/// convolutions): each row equals what that adapter gives the image alone.
#[test]
fn resnet_mixed_adapter_batch_equals_per_row_singles() {
    for name in ["resnet", "resnet_cls"] {
        let device = Device::flex();
        let inputs = images(name, &device);
        let mut model = base(name, &device);
        model
            .load_adapter(model_dir(name).join("lora"), "a")
            .unwrap();
        device.seed(5);
        let second = LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            init_lora_weights: InitLoraWeights::Bool(false),
            target_modules: Some(r".*\.convolution".into()),
            ..Default::default()
        };
        model.add_adapter("b", &second).unwrap();
        let names = ["a", "b"];
        let ctx = model.adapter_rows(&names, &device).unwrap();
        let mixed = values(&model.model().forward_with(&inputs, &ctx).unwrap());
        let per_row = mixed.len() / names.len();
        let mut singles = Vec::new();
        for (row, adapter) in names.iter().enumerate() {
            model.set_adapter(adapter).unwrap();
            let alone = run(model.model(), &inputs);
            let range = row * per_row..(row + 1) * per_row;
            let diff = max_rel_diff(&mixed[range.clone()], &alone[range.clone()]);
            assert!(
                diff < 1e-5,
                "{name}: row {row} ({adapter}) differs by {diff}"
            );
            singles.push(alone[range].to_vec());
        }
        assert_ne!(singles[0], singles[1], "{name}: the two adapters differ");
    }
}

/// Images with another channel count, no images and an empty batch are typed input errors.
#[test]
fn resnet_bad_images_are_typed_errors() {
    let device = Device::flex();
    let model = base("resnet_cls", &device);
    let gray = ModelInputs::images(Tensor::zeros([2, 1, 32, 32], &device));
    let empty = ModelInputs::images(Tensor::zeros([0, 3, 32, 32], &device));
    let mut none = ModelInputs::images(Tensor::zeros([1, 3, 32, 32], &device));
    none.pixel_values = None;
    for (what, inputs) in [("gray", gray), ("empty", empty), ("none", none)] {
        match model.model().forward(&inputs) {
            Err(ModelError::InputOutOfRange { input, .. }) => assert_eq!(input, "pixel_values"),
            other => panic!("{what}: expected a pixel_values error, got {other:?}"),
        }
    }
}

/// ResNet has no attention: prefix tuning is refused when added, never ignored.
#[test]
fn resnet_refuses_prefix_tuning() {
    let device = Device::flex();
    let mut model = base("resnet", &device);
    let prefix = PrefixTuningConfig {
        num_virtual_tokens: 4,
        ..Default::default()
    };
    match model.add_adapter("prefix", &prefix) {
        Err(PeftError::UnsupportedSite { kind, .. }) => {
            assert!(kind.contains("prefix"), "{kind}")
        }
        other => panic!("prefix tuning on ResNet: expected UnsupportedSite, got {other:?}"),
    }
    assert_eq!(model.model().num_layers(), 2);
    assert_eq!(model.model().vocab_size(), 0);
}

/// On an autodiff device an unfrozen BatchNorm takes the batch's statistics (PyTorch's train
/// mode, which also updates the running ones); `valid()` computes eval mode with the running
/// statistics.
#[test]
fn resnet_batch_norm_follows_the_device_mode() {
    let device = Device::flex().autodiff();
    let model = base("resnet", &device);
    let expected = model_dir("resnet").join("expected.safetensors");
    let eval = model.model().valid();
    close(
        &run(&eval, &images("resnet", &Device::flex())),
        &expected,
        "pooler_output",
    );
    let train = run(model.model(), &images("resnet", &device));
    let theirs = read_all(&expected).remove("pooler_output").unwrap().0;
    assert!(
        max_rel_diff(&train, &theirs) > 1e-3,
        "batch statistics on autodiff"
    );
}
