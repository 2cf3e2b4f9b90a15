//! Gemma 3 text against transformers + PEFT (`tests/fixtures/gen/gemma3_tiny.py`): sliding
//! and global layers interleaved (a window shorter than the input) with their own RoPE, the
//! `1 + weight` norms, embedding scale, `query_pre_attn_scalar` and final logit soft-capping,
//! with LoRA, the same LoRA as `adapter_model.bin`, PEFT's default targets, DoRA, IA3 and
//! prefix tuning (merged, saved and reloaded where PEFT merges); greedy generation with and
//! without the KV cache; the text classifier with `modules_to_save`; a training step and a
//! mixed-adapter batch.

use crate::common::family::{self, Bundle};

#[test]
fn gemma3_causal_lm_matches_transformers_and_peft() {
    let report = family::check(
        "gemma3",
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
fn gemma3_text_classifier_matches_transformers_and_peft() {
    family::check("gemma3_cls", &[Bundle::Lora]);
}

#[test]
fn gemma3_trains_with_lora_and_runs_mixed_adapter_batches() {
    family::trains("gemma3");
    family::mixed_batch("gemma3");
}
