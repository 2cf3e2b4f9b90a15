//! Phi-3 against transformers + PEFT (`tests/fixtures/gen/phi3_tiny.py`): fused `qkv_proj` and
//! `gate_up_proj` (LoRA, DoRA and IA3 on the fused modules, as PEFT targets them), partial
//! rotary, LongRoPE (short factors up to the original context, long ones past it, and greedy
//! generation across the switch), with LoRA, the same LoRA as `adapter_model.bin`, DoRA, IA3
//! and prefix tuning (merged, saved and reloaded where PEFT merges); the sequence classifier
//! with `modules_to_save`; a training step and a mixed-adapter batch.

use crate::common;

use burn::tensor::{Device, Tensor};
use burn_peft::core::PeftError;
use burn_peft::lora::LoraConfig;
use burn_peft::models::ModelInputs;
use common::family::{self, Bundle};
use common::hf::{inputs, load, logits, max_diff_valid, model_dir, read_all};

#[test]
fn phi3_causal_lm_matches_transformers_and_peft() {
    let report = family::check(
        "phi3",
        &[
            Bundle::Lora,
            Bundle::LoraBin,
            Bundle::Dora,
            Bundle::Ia3,
            Bundle::Prefix,
        ],
    );
    assert!(report.generations >= 2, "{report:?}");
}

#[test]
fn phi3_long_rope_switches_factors_as_transformers_does() {
    // 7 positions pass the original context of 4: the long factors, with LoRA, merged and
    // saved; greedy generation crosses the switch (the cache is recomputed there).
    let report = family::check("phi3_longrope", &[Bundle::Lora]);
    assert_eq!(report.generations, 2, "{report:?}");
    // The first 3 positions stay within it: the short factors.
    let device = Device::flex();
    let (batch, mask) = inputs("phi3_longrope", &device);
    let first3 = |t: Tensor<2, burn::tensor::Int>| t.narrow(1, 0, 3);
    let short = ModelInputs {
        input_ids: first3(batch.input_ids.clone()),
        attention_mask: batch.attention_mask.clone().map(first3),
        token_type_ids: None,
        pixel_values: None,
    };
    let model = load("phi3_longrope", &device);
    let ours = logits(&model.model().forward(&short).unwrap());
    let expected = read_all(&model_dir("phi3_longrope").join("expected.safetensors"));
    let short_mask: Vec<f32> = mask.chunks(7).flat_map(|row| row[..3].to_vec()).collect();
    let diff = max_diff_valid(&ours, &expected["short_logits"].0, Some(&short_mask));
    assert!(diff < family::TOL, "short factors differ by {diff}");
}

#[test]
fn phi3_sequence_classifier_matches_transformers_and_peft() {
    family::check("phi3_cls", &[Bundle::Lora]);
}

#[test]
fn phi3_has_no_peft_default_targets() {
    // PEFT 0.21.2 has no `phi3` entry: "Please specify `target_modules`".
    let mut model = load("phi3", &Device::flex());
    match model.add_adapter("default", &LoraConfig::default()) {
        Err(PeftError::InvalidConfig { key, .. }) => assert_eq!(key, "target_modules"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn phi3_trains_with_lora_and_runs_mixed_adapter_batches() {
    family::trains("phi3");
    family::mixed_batch("phi3");
}
