//! The tiny model fixtures of `tests/fixtures/gen/models_tiny.py` (`tests/fixtures/models/`):
//! their folders, inputs and PEFT LoRA, and a small learnable LM task, shared by the tests that
//! run them on other devices and precisions.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::PeftModel;
use burn_peft::models::{HfModel, ModelInputs, Task, from_pretrained};
use burn_peft::train::data::Example;

/// The folder of fixture model `name` (`llama_gqa`, `bert_cls`, ...).
pub fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// The int64 tensor `key` of a safetensors file, when the file has it.
pub fn int_tensor(file: &Path, key: &str, device: &Device) -> Option<Tensor<2, Int>> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).ok()?;
    let v: Vec<i64> = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some(Tensor::from_data(
        TensorData::new(v, view.shape().to_vec()),
        device,
    ))
}

/// The padded batch the fixture's references were computed on, on `device`.
pub fn model_inputs(name: &str, device: &Device) -> ModelInputs {
    let file = model_dir(name).join("inputs.safetensors");
    ModelInputs {
        input_ids: int_tensor(&file, "input_ids", device).unwrap(),
        attention_mask: int_tensor(&file, "attention_mask", device),
        token_type_ids: int_tensor(&file, "token_type_ids", device),
        pixel_values: None,
    }
}

/// The fixture model with its PEFT LoRA (non-zero A and B, no dropout), trainable.
pub fn with_lora(name: &str, device: &Device) -> PeftModel<HfModel> {
    let base = from_pretrained(model_dir(name).to_str().unwrap(), Task::Auto, device).unwrap();
    let mut model = PeftModel::new(base.model);
    model
        .load_adapter_trainable(model_dir(name).join("lora"), "default")
        .unwrap();
    model
}

/// A learnable LM task: four fixed token sequences, `n` examples.
pub fn lm_data(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let start = 1 + (i as i64 % 4) * 20;
            let ids: Vec<i64> = (0..8).map(|k| start + 3 * k).collect();
            Example {
                token_type_ids: vec![0; ids.len()],
                labels: Some(ids.clone()),
                input_ids: ids,
                label: None,
                line: 0,
                segments: Vec::new(),
                image: None,
            }
        })
        .collect()
}
