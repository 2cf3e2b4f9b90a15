//! Qwen3 against transformers + PEFT (`tests/fixtures/gen/qwen3_tiny.py`): the causal LM (GQA,
//! per-head q/k norms) with LoRA, the same LoRA as `adapter_model.bin`, PEFT's default targets,
//! DoRA, IA3 and prefix tuning, each merged, saved and reloaded where PEFT merges; greedy
//! generation with and without the KV cache; the sequence classifier with `modules_to_save`;
//! a training step and a mixed-adapter batch.

use crate::common::family::{self, Bundle};

#[test]
fn qwen3_causal_lm_matches_transformers_and_peft() {
    let report = family::check(
        "qwen3",
        &[
            Bundle::Lora,
            Bundle::LoraBin,
            Bundle::LoraDefault,
            Bundle::Dora,
            Bundle::Ia3,
            Bundle::Prefix,
        ],
    );
    assert!(report.generations >= 2, "{report:?}");
}

#[test]
fn qwen3_sequence_classifier_matches_transformers_and_peft() {
    family::check("qwen3_cls", &[Bundle::Lora]);
}

#[test]
fn qwen3_trains_with_lora_and_runs_mixed_adapter_batches() {
    family::trains("qwen3");
    family::mixed_batch("qwen3");
}
