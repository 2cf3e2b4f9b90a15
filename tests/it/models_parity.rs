//! The model zoo against transformers (+ PEFT) on tiny random-weight models made by
//! `tests/fixtures/gen/models_tiny.py`: padded batches, base and LoRA (active and merged),
//! greedy generation with and without the KV cache.

use crate::common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::PeftModel;
use burn_peft::models::{
    GenerationConfig, ModelInputs, ModelOutputs, Task, from_pretrained, generate,
};

/// Parity tolerance (absolute) against transformers' float32 outputs.
const TOL: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn read_ints(file: &Path, key: &str) -> Option<(Vec<i64>, Vec<usize>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).ok()?;
    let v = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some((v, view.shape().to_vec()))
}

fn int_tensor(file: &Path, key: &str, device: &Device) -> Option<Tensor<2, Int>> {
    read_ints(file, key).map(|(v, s)| Tensor::from_data(TensorData::new(v, s), device))
}

fn inputs(name: &str, device: &Device) -> (ModelInputs, Vec<i64>) {
    let file = dir(name).join("inputs.safetensors");
    let mask = read_ints(&file, "attention_mask").unwrap().0;
    (
        ModelInputs {
            input_ids: int_tensor(&file, "input_ids", device).unwrap(),
            attention_mask: int_tensor(&file, "attention_mask", device),
            token_type_ids: int_tensor(&file, "token_type_ids", device),
            pixel_values: None,
        },
        mask,
    )
}

fn floats(file: &Path, key: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st
        .tensor(key)
        .unwrap_or_else(|_| panic!("{key} in {}", file.display()));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{key}");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (values, view.shape().to_vec())
}

/// Largest difference over the valid (non-pad) positions; `mask` is `[b, s]` when the tensor is
/// `[b, s, ...]`.
fn max_diff_valid(ours: &[f32], theirs: &[f32], shape: &[usize], mask: Option<&[i64]>) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "shape {shape:?}");
    let per_pos: usize = shape[2..].iter().product::<usize>().max(1);
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(i, _)| mask.is_none_or(|m| m[i / per_pos] == 1))
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0, f32::max)
}

fn check(outputs: &ModelOutputs, expected: &Path, prefix: &str, mask: &[i64], what: &str) {
    let pairs: Vec<(&str, Option<Vec<f32>>, bool)> = vec![
        ("logits", outputs.logits.clone().map(values3), true),
        ("logits", outputs.class_logits.clone().map(values2), false),
        (
            "last_hidden_state",
            outputs.last_hidden_state.clone().map(values3),
            true,
        ),
        (
            "sentence_embedding",
            outputs.sentence_embedding.clone().map(values2),
            false,
        ),
        (
            "pooler_output",
            outputs.pooler_output.clone().map(values2),
            false,
        ),
    ];
    let mut checked = 0;
    for (key, ours, per_token) in pairs {
        let Some(ours) = ours else { continue };
        let (theirs, shape) = floats(expected, &format!("{prefix}{key}"));
        let diff = max_diff_valid(&ours, &theirs, &shape, per_token.then_some(mask));
        eprintln!("{what}: {key} max |diff| {diff:.2e}");
        assert!(
            diff < TOL,
            "{what}: `{key}` differs from transformers by {diff}"
        );
        checked += 1;
    }
    assert!(checked > 0, "{what}: nothing compared");
}

fn values3(t: Tensor<3>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn values2(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn parity(name: &str) {
    let Some(device) = common::test_device(name) else {
        return;
    };
    let (inputs, mask) = inputs(name, &device);
    let pretrained = from_pretrained(dir(name).to_str().unwrap(), Task::Auto, &device)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut model = PeftModel::new(pretrained.model);
    check(
        &model.model().forward(&inputs).unwrap(),
        &dir(name).join("expected.safetensors"),
        "",
        &mask,
        name,
    );

    model
        .load_adapter(dir(name).join("lora"), "default")
        .unwrap();
    let lora = dir(name).join("lora/expected.safetensors");
    check(
        &model.model().forward(&inputs).unwrap(),
        &lora,
        "",
        &mask,
        &format!("{name} + LoRA"),
    );
    model.merge().unwrap();
    check(
        &model.model().forward(&inputs).unwrap(),
        &lora,
        "merged_",
        &mask,
        &format!("{name} + merged LoRA"),
    );
}

#[test]
fn bert_matches_transformers() {
    parity("bert");
}

#[test]
fn bert_classifier_matches_transformers() {
    parity("bert_cls");
}

#[test]
fn gpt2_matches_transformers() {
    parity("gpt2");
}

#[test]
fn llama_gqa_untied_matches_transformers() {
    parity("llama_gqa");
}

#[test]
fn llama_tied_with_llama3_rope_matches_transformers() {
    parity("llama_tied");
}

#[test]
fn qwen2_matches_transformers() {
    parity("qwen2");
}

#[test]
fn mistral_matches_transformers() {
    parity("mistral");
}

#[test]
fn llama_classifier_matches_transformers() {
    parity("llama_cls");
}

fn greedy(name: &str) {
    let Some(device) = common::test_device(name) else {
        return;
    };
    let pretrained = from_pretrained(dir(name).to_str().unwrap(), Task::Auto, &device).unwrap();
    let mut model = PeftModel::new(pretrained.model);
    let prompt = [5, 9, 17, 3];
    let config = GenerationConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    for (expected_file, with_lora) in [
        ("expected.safetensors", false),
        ("lora/expected.safetensors", true),
    ] {
        if with_lora {
            model
                .load_adapter(dir(name).join("lora"), "default")
                .unwrap();
        }
        let (want, _) = read_ints(&dir(name).join(expected_file), "greedy_ids").unwrap();
        let cached = generate(model.model(), &prompt, &config, &device).unwrap();
        let uncached = generate(
            model.model(),
            &prompt,
            &GenerationConfig {
                use_cache: false,
                ..config.clone()
            },
            &device,
        )
        .unwrap();
        assert_eq!(
            cached, uncached,
            "{name}: cached generation differs from uncached"
        );
        assert_eq!(
            cached, want,
            "{name} (lora: {with_lora}): greedy ids differ from transformers"
        );
    }
}

#[test]
fn gpt2_greedy_generation_matches_transformers_and_cache_is_exact() {
    greedy("gpt2");
}

#[test]
fn llama_greedy_generation_matches_transformers_and_cache_is_exact() {
    greedy("llama_gqa");
}

#[test]
fn sampling_is_seeded() {
    let device = Device::flex();
    let pretrained =
        from_pretrained(dir("llama_gqa").to_str().unwrap(), Task::Auto, &device).unwrap();
    let config = GenerationConfig {
        max_new_tokens: 6,
        temperature: 0.8,
        top_k: Some(20),
        top_p: Some(0.9),
        seed: 11,
        ..Default::default()
    };
    let a = generate(&pretrained.model, &[5, 9], &config, &device).unwrap();
    let b = generate(&pretrained.model, &[5, 9], &config, &device).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 8);
    let eos = GenerationConfig {
        eos_token_ids: vec![a[2]],
        ..config
    };
    assert_eq!(
        generate(&pretrained.model, &[5, 9], &eos, &device).unwrap(),
        a[..3]
    );
}
