//! config.json options that change the math are implemented, not ignored: Mistral's sliding
//! window, GPT-2's `scale_attn_by_inverse_layer_idx` / `scale_attn_weights`, and the other
//! activations of transformers' `ACT2FN`, against transformers outputs
//! (`tests/fixtures/gen/config_variants.py`) on the tiny models' padded batch.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::models::{ModelInputs, Task, from_pretrained};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(file: &Path) -> safetensors::SafeTensors<'static> {
    let bytes: &'static [u8] = Box::leak(std::fs::read(file).unwrap().into_boxed_slice());
    safetensors::SafeTensors::deserialize(bytes).unwrap()
}

fn ints(st: &safetensors::SafeTensors, key: &str) -> (Vec<i64>, Vec<usize>) {
    let view = st.tensor(key).unwrap();
    let values = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (values, view.shape().to_vec())
}

fn floats(st: &safetensors::SafeTensors, key: &str) -> Vec<f32> {
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Largest difference at valid (unmasked) positions; `width` values per position.
fn max_diff(a: &[f32], b: &[f32], mask: &[i64], width: usize) -> f32 {
    a.chunks(width)
        .zip(b.chunks(width))
        .zip(mask)
        .filter(|(_, m)| **m == 1)
        .flat_map(|((x, y), _)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn run(case: &str, base: &str, key: &str) -> (f32, f32) {
    let dir = tempfile::tempdir().unwrap();
    let variant = fixtures().join("config_variants").join(case);
    let source = fixtures().join("models").join(base);
    std::fs::copy(variant.join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(
        source.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let device = Device::flex();
    let task = if key == "logits" {
        Task::CausalLm
    } else {
        Task::Encoder
    };
    let model = from_pretrained(dir.path().to_str().unwrap(), task, &device)
        .unwrap()
        .model;
    let inputs = read(&source.join("inputs.safetensors"));
    let t = |key: &str| {
        let (v, s) = ints(&inputs, key);
        Tensor::<2, Int>::from_data(TensorData::new(v, s), &device)
    };
    let (mask, _) = ints(&inputs, "attention_mask");
    let out = model
        .forward(&ModelInputs {
            input_ids: t("input_ids"),
            attention_mask: Some(t("attention_mask")),
            token_type_ids: inputs
                .names()
                .contains(&"token_type_ids")
                .then(|| t("token_type_ids")),
            pixel_values: None,
        })
        .unwrap();
    let ours: Vec<f32> = match key {
        "logits" => out.logits.unwrap(),
        _ => out.last_hidden_state.unwrap(),
    }
    .into_data()
    .try_to_vec()
    .unwrap();
    let width = *read(&variant.join("expected.safetensors"))
        .tensor(key)
        .unwrap()
        .shape()
        .last()
        .unwrap();
    let theirs = floats(&read(&variant.join("expected.safetensors")), key);
    let base_key = key;
    let plain = floats(&read(&source.join("expected.safetensors")), base_key);
    (
        max_diff(&ours, &theirs, &mask, width),
        max_diff(&plain, &theirs, &mask, width),
    )
}

#[test]
fn config_options_that_change_the_math_match_transformers() {
    for (case, base, key) in [
        ("mistral_window3", "mistral", "logits"),
        ("gpt2_inverse_layer_scale", "gpt2", "logits"),
        ("gpt2_unscaled", "gpt2", "logits"),
        ("gpt2_relu", "gpt2", "logits"),
        ("bert_gelu_new", "bert", "last_hidden_state"),
        ("bert_quick_gelu", "bert", "last_hidden_state"),
        ("bert_silu", "bert", "last_hidden_state"),
    ] {
        let (diff, effect) = run(case, base, key);
        eprintln!("{case}: {diff:.2e} from transformers, the option moves outputs by {effect:.2e}");
        assert!(diff < 1e-5, "{case}: {diff} from transformers");
        // The option really changes the output, so matching it is not matching the base model
        // (gelu_new differs from exact gelu by ~1e-3 here).
        assert!(
            effect > 20.0 * diff.max(1e-6),
            "{case}: the option changed nothing ({effect})"
        );
    }
}
