//! Merged models back to GGUF (`peft_models::gguf::write_merged`), read back by our loader: the
//! tiny files of `tests/fixtures/gen/gguf_tiny.py` with a LoRA on every linear layer, merged,
//! written in F32 (so nothing is lost) and reloaded, give the adapted model's logits. That
//! round trip goes through llama.cpp's layout both ways: Llama's permuted Q/K rows, Gemma's
//! `1 + w` norms, Phi-3's fused projections, tied and untied heads. (llama.cpp itself runs our
//! exports in `crates/peft-cli/tests/gguf_export.rs`.)

use crate::common;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::PeftModel;
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use burn_peft::models::gguf::{GgufFile, write_merged};
use burn_peft::models::quantized::QuantFormat;
use burn_peft::models::{HfModel, ModelInputs, Task, from_pretrained, hf_tensors};
use common::hf::{fixture, logits};

fn gguf(name: &str) -> PathBuf {
    fixture("gguf").join(name)
}

fn inputs(device: &Device) -> ModelInputs {
    let ids: Vec<i64> = vec![5, 9, 17, 3, 36, 4, 7, 1, 2, 3, 4, 5];
    ModelInputs {
        input_ids: Tensor::<2, Int>::from_data(TensorData::new(ids, vec![2, 6]), device),
        attention_mask: None,
        token_type_ids: None,
        pixel_values: None,
    }
}

fn load(path: &std::path::Path, device: &Device) -> HfModel {
    from_pretrained(path.to_str().unwrap(), Task::CausalLm, device)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .model
}

#[test]
fn merged_models_round_trip_through_gguf() {
    let device = Device::flex();
    for name in ["llama_q", "qwen2_q", "qwen3_q", "gemma3_q", "phi3_f32"] {
        let path = gguf(&format!("{name}.gguf"));
        let mut peft = PeftModel::new(load(&path, &device));
        let lora = LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            target_modules: Some("all-linear".into()),
            // Random A and B: the adapter changes the logits.
            init_lora_weights: InitLoraWeights::Bool(false),
            ..Default::default()
        };
        peft.add_adapter("default", &lora).unwrap();
        let x = inputs(&device);
        let adapted = logits(&peft.model().forward(&x).unwrap());
        let base = {
            let plain = load(&path, &device);
            logits(&plain.forward(&x).unwrap())
        };
        let effect = adapted
            .iter()
            .zip(&base)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            effect > 1e-2,
            "{name}: the adapter changes nothing ({effect})"
        );

        let merged = peft.merge_and_unload().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged.gguf");
        let source = GgufFile::open(&path).unwrap();
        write_merged(
            &source,
            hf_tensors(&merged, tmp.path()).unwrap(),
            QuantFormat::F32,
            &out,
        )
        .unwrap();
        let reread = load(&out, &device);
        let ours = logits(&reread.forward(&x).unwrap());
        let diff = ours
            .iter()
            .zip(&adapted)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{name}: merged GGUF vs adapted {diff:.2e} (adapter effect {effect:.2e})");
        assert!(
            diff < 1e-4,
            "{name}: merged GGUF read back differs by {diff}"
        );
        // Same metadata (the tokenizer, the chat template, ...) and tensors as the source.
        let written = GgufFile::open(&out).unwrap();
        assert_eq!(written.tensors.len(), source.tensors.len());
        for (key, value) in &source.metadata {
            if key != "general.file_type" {
                assert_eq!(written.get(key), Some(value), "{name}: {key}");
            }
        }
    }
}
