//! The real sentence-transformers/all-MiniLM-L6-v2 (laid into the Hugging Face cache by
//! `scripts/fetch-minilm.sh`), resolved by hub id with `HF_HUB_OFFLINE=1`, against the
//! sentence-transformers embeddings `tests/fixtures/gen/minilm.py` computed.

use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use burn_peft::models::{ModelInputs, Task, from_pretrained};

const MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm")
}

fn tensor_values(key: &str) -> (Vec<u8>, Vec<usize>, safetensors::Dtype) {
    let bytes = std::fs::read(fixture().join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).unwrap();
    (view.data().to_vec(), view.shape().to_vec(), view.dtype())
}

fn ints(key: &str) -> Vec<i64> {
    let (data, _, _) = tensor_values(key);
    data.chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn floats(key: &str) -> Vec<f32> {
    let (data, _, _) = tensor_values(key);
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    // SAFETY: set before any thread of this test binary reads the environment.
    unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    let device = Device::flex();
    let start = Instant::now();
    let pretrained = from_pretrained(MODEL, Task::Encoder, &device).unwrap_or_else(|e| {
        panic!("{e}\nrun scripts/fetch-minilm.sh first (it lays the model into the HF cache)")
    });
    let sentences: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("sentences.json")).unwrap())
            .unwrap();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let tokenizer = pretrained
        .tokenizer
        .as_ref()
        .expect("tokenizer.json in the snapshot");
    let batch = tokenizer.batch(&texts, 128, &device).unwrap();
    let inputs = ModelInputs {
        input_ids: batch.input_ids.clone(),
        attention_mask: Some(batch.attention_mask.clone()),
        token_type_ids: Some(batch.token_type_ids.clone()),
        pixel_values: None,
    };
    let out = pretrained.model.forward(&inputs).unwrap();
    let embedding: Tensor<2> = out.sentence_embedding.unwrap();
    let ours = embedding.into_data().try_to_vec::<f32>().unwrap();
    let cold = start.elapsed();
    eprintln!("cold load of all-MiniLM-L6-v2 + tokenize + first forward: {cold:?}");

    // Our tokenizer gives exactly the ids sentence-transformers used.
    let ids = batch
        .input_ids
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    assert_eq!(ids, ints("input_ids"));
    let mask = batch
        .attention_mask
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    assert_eq!(mask, ints("attention_mask"));
    assert_eq!(
        batch
            .token_type_ids
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap(),
        ints("token_type_ids")
    );

    let theirs = floats("sentence_embedding");
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("sentence_embedding max |diff| vs sentence-transformers: {diff:.2e}");
    assert!(diff < 1e-4, "embeddings differ by {diff}");

    let hidden = out
        .last_hidden_state
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let theirs = floats("last_hidden_state");
    let per_token = 384;
    let diff = hidden
        .iter()
        .zip(&theirs)
        .enumerate()
        .filter(|(i, _)| mask[i / per_token] == 1)
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("last_hidden_state max |diff| (valid tokens): {diff:.2e}");
    assert!(diff < 1e-4, "hidden states differ by {diff}");
}
