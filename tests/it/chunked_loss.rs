//! The causal LM loss taken over the vocabulary in chunks of tokens
//! (`peft_train::chunked_causal_lm_loss`, what the training step uses for a frozen head) gives
//! the loss and the adapter gradients of the whole-logits loss, on tied and untied heads,
//! Gemma's soft-capped logits and GPT-2, with masked prompt tokens and chunks that do not divide
//! the tokens.

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::nn::ForwardContext;
use burn_peft::models::ModelInputs;
use burn_peft::train::data::{Example, collate};
use burn_peft::train::step::forward_loss;
use burn_peft::train::{Task, causal_lm_loss_terms, chunked_causal_lm_loss, evaluate};

use crate::common::fixture_models::with_lora;
use crate::common::hf::{adapter_grads, max_rel_diff};

/// Two rows of 9 tokens, the first three of each without loss, one of them padded.
fn batch(device: &Device) -> (ModelInputs, Tensor<2, Int>) {
    let ids: Vec<i64> = (0..18).map(|i| 1 + (i * 37 % 120)).collect();
    let mut labels = ids.clone();
    for row in 0..2 {
        labels[row * 9..row * 9 + 3].fill(-100);
    }
    labels[16..].fill(-100);
    let mut mask = vec![1i64; 18];
    mask[16..].fill(0);
    let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [2, 9]), device);
    (
        ModelInputs {
            input_ids: t(ids),
            attention_mask: Some(t(mask)),
            token_type_ids: None,
            pixel_values: None,
        },
        t(labels),
    )
}

#[test]
fn chunked_loss_matches_the_whole_logits_loss() {
    let device = Device::flex().autodiff();
    for name in ["llama_tied", "llama_gqa", "gemma3", "gpt2"] {
        let (inputs, labels) = batch(&device);
        let fc = ForwardContext::default();
        // The whole logits at once.
        let model = with_lora(name, &device);
        let logits = model.model().forward(&inputs).unwrap().logits.unwrap();
        let (loss, _) = causal_lm_loss_terms(logits, labels.clone());
        let expected: f32 = loss.clone().into_scalar();
        let expected_grads = adapter_grads(&model, "default", &loss.backward());
        for chunk in [1, 5, 16, 64] {
            let model = with_lora(name, &device);
            let (h, head) = model
                .model()
                .lm_hidden_with(&inputs, &fc)
                .unwrap()
                .expect("a causal LM");
            assert!(head.is_frozen(), "{name}: the head trains nothing");
            let loss = chunked_causal_lm_loss(h, &head, labels.clone(), chunk, &fc);
            let value: f32 = loss.clone().into_scalar();
            assert!(
                (value - expected).abs() < 1e-5 * expected.abs().max(1.0),
                "{name}, chunk {chunk}: loss {value} vs {expected}"
            );
            let grads = adapter_grads(&model, "default", &loss.backward());
            assert_eq!(grads.len(), expected_grads.len());
            for (tensor, g) in &expected_grads {
                let diff = max_rel_diff(&grads[tensor], g);
                assert!(
                    diff < 1e-5,
                    "{name}, chunk {chunk}: {tensor} differs by {diff}"
                );
            }
        }
    }
}

/// The training step (which takes the chunked path for a frozen head) gets the loss of the
/// whole logits.
#[test]
fn the_training_step_takes_the_same_loss() {
    let device = Device::flex().autodiff();
    let examples: Vec<Example> = [7usize, 4, 9]
        .iter()
        .map(|&n| {
            let ids: Vec<i64> = (0..n as i64).map(|k| 3 + k * 11 % 120).collect();
            Example {
                token_type_ids: vec![0; n],
                labels: Some(ids.clone()),
                input_ids: ids,
                label: None,
                line: 0,
                segments: Vec::new(),
                image: None,
            }
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = collate(&refs, 0, &device);
    let model = with_lora("llama_tied", &device);
    let step: f32 = forward_loss(model.model(), Task::CausalLm, &batch)
        .unwrap()
        .into_scalar();
    let inputs = ModelInputs {
        input_ids: batch.input_ids.clone(),
        attention_mask: Some(batch.attention_mask.clone()),
        token_type_ids: None,
        pixel_values: None,
    };
    let logits = model.model().forward(&inputs).unwrap().logits.unwrap();
    let whole: f32 = causal_lm_loss_terms(logits, batch.lm_labels.clone().unwrap())
        .0
        .into_scalar();
    assert!((step - whole).abs() < 1e-5, "{step} vs {whole}");
}

/// Evaluation takes the per-example losses in chunks too: each equals the example's own
/// whole-logits loss.
#[test]
fn evaluation_losses_match_each_example_alone() {
    let device = Device::flex();
    for name in ["llama_tied", "gemma3"] {
        let model = with_lora(name, &device);
        let examples: Vec<Example> = [7usize, 4, 9, 2]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let ids: Vec<i64> = (0..n as i64)
                    .map(|k| 1 + (i as i64 * 17 + k * 13) % 120)
                    .collect();
                let mut labels = ids.clone();
                labels[0] = -100;
                Example {
                    token_type_ids: vec![0; n],
                    labels: Some(labels),
                    input_ids: ids,
                    label: None,
                    line: i + 1,
                    segments: Vec::new(),
                    image: None,
                }
            })
            .collect();
        let report = evaluate(model.model(), &examples, Task::CausalLm, 0, 3, &device).unwrap();
        let (mut total, mut tokens) = (0.0f64, 0usize);
        for (e, got) in examples.iter().zip(&report.examples) {
            let n = e.input_ids.len();
            let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [1, n]), &device);
            let inputs = ModelInputs {
                input_ids: t(e.input_ids.clone()),
                attention_mask: None,
                token_type_ids: None,
                pixel_values: None,
            };
            let logits = model.model().forward(&inputs).unwrap().logits.unwrap();
            let (loss, count) = causal_lm_loss_terms(logits, t(e.labels.clone().unwrap()));
            let (loss, count) = (
                loss.into_scalar::<f64>(),
                count.into_scalar::<f64>() as usize,
            );
            assert_eq!(got.tokens, Some(count), "{name}");
            let ours = got.loss.unwrap();
            assert!(
                (ours - loss).abs() < 1e-5 * loss.abs().max(1.0),
                "{name}: {ours} vs {loss}"
            );
            total += loss * count as f64;
            tokens += count;
        }
        let mean = total / tokens as f64;
        assert!(
            (report.loss - mean).abs() < 1e-5 * mean.abs().max(1.0),
            "{name}: {} vs {mean}",
            report.loss
        );
    }
}
