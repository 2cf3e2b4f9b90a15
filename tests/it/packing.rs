//! Packed rows (TRL's `packing=True`): several sequences in one batch row, kept apart by
//! [`PackedRows`] in the forward context. Each sequence of a packed batch must give the logits
//! it gives alone (which the family tests match against transformers + PEFT): no attention
//! across sequences, positions restarting at each one, sliding windows (Gemma 3) and learned
//! positions (GPT-2) included, with a LoRA adapter and with a prefix-tuning prefix.

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::nn::{ForwardContext, PackedRows};
use burn_peft::models::{ModelError, ModelInputs};

use burn_peft::train::Task;
use burn_peft::train::data::{Example, collate, pack};
use burn_peft::train::step::forward_loss;

use crate::common::fixture_models::with_lora;
use crate::common::hf::{adapter_grads, load, logits, max_rel_diff, model_dir};

/// Three sequences of ids inside the fixtures' vocabulary of 128.
fn sequences() -> [Vec<i64>; 3] {
    [vec![5, 17, 99, 3, 42], vec![7, 8, 120], vec![64, 1, 33, 90]]
}

fn ids(values: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Row 0: sequences a and b, then one padding column; row 1: sequence c, then a again.
fn packed_batch(device: &Device, pad: i64) -> (ModelInputs, PackedRows) {
    let [a, b, c] = sequences();
    let row0: Vec<i64> = a.iter().chain(&b).copied().chain([pad]).collect();
    let row1: Vec<i64> = c.iter().chain(&a).copied().collect();
    let mask: Vec<i64> = [1; 8].into_iter().chain([0]).chain([1; 9]).collect();
    let inputs = ModelInputs {
        input_ids: ids([row0, row1].concat(), [2, 9], device),
        attention_mask: Some(ids(mask, [2, 9], device)),
        token_type_ids: None,
        pixel_values: None,
    };
    (
        inputs,
        PackedRows::new(vec![vec![5, 3], vec![4, 5]]).unwrap(),
    )
}

/// `(row, first column, sequence)` of every packed sequence.
fn placements() -> [(usize, usize, usize); 4] {
    [(0, 0, 0), (0, 5, 1), (1, 0, 2), (1, 4, 0)]
}

fn check_family(name: &str, adapter: Option<&str>) {
    let device = Device::flex();
    let mut model = load(name, &device);
    if let Some(folder) = adapter {
        model
            .load_adapter(model_dir(name).join(folder), "adapter")
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let (inputs, packed) = packed_batch(&device, 0);
    let fc = ForwardContext::default().with_packed(packed);
    let out = logits(&model.model().forward_with(&inputs, &fc).unwrap());
    let vocab = out.len() / 18;
    let seqs = sequences();
    for (row, start, seq) in placements() {
        let ids_alone = seqs[seq].clone();
        let n = ids_alone.len();
        let alone = ModelInputs {
            input_ids: ids(ids_alone, [1, n], &device),
            attention_mask: None,
            token_type_ids: None,
            pixel_values: None,
        };
        let expected = logits(&model.model().forward(&alone).unwrap());
        let at = (row * 9 + start) * vocab;
        let diff = max_rel_diff(&out[at..at + n * vocab], &expected);
        assert!(
            diff < 1e-5,
            "{name} ({adapter:?}): sequence {seq} at row {row}, column {start} differs by {diff}"
        );
    }
}

// Not `phi3_longrope`: LongRoPE picks its factors from the largest position of the whole
// forward (transformers' `longrope_frequency_update`: `max(position_ids) + 1`), so a short
// sequence batched or packed beside a long one rotates with the long factors there too.
#[test]
fn packed_sequences_match_each_sequence_alone() {
    for name in ["llama_gqa", "qwen3", "phi3", "gemma3", "mistral", "gpt2"] {
        check_family(name, Some("lora"));
    }
}

#[test]
fn packed_sequences_see_their_prefix() {
    for name in ["gemma3", "qwen3"] {
        check_family(name, Some("prefix"));
    }
}

#[test]
fn packing_is_refused_where_it_cannot_hold() {
    let device = Device::flex();
    let model = load("llama_gqa", &device);
    let (inputs, _) = packed_batch(&device, 0);
    let fc = |lengths| ForwardContext::default().with_packed(PackedRows::new(lengths).unwrap());
    // More packed tokens than columns, and lengths for another number of rows.
    for lengths in [vec![vec![5, 5], vec![4]], vec![vec![9]]] {
        let err = model
            .model()
            .forward_with(&inputs, &fc(lengths))
            .unwrap_err();
        assert!(
            matches!(&err, ModelError::InputOutOfRange { input, .. } if input == "packed rows"),
            "{err}"
        );
    }
    assert!(
        PackedRows::new(vec![vec![3, 0]]).is_none(),
        "an empty sequence"
    );
    // A classifier pools one token per row: packing would mix the sequences.
    let classifier = load("llama_cls", &device);
    let err = classifier
        .model()
        .forward_with(&inputs, &fc(vec![vec![5, 3], vec![4, 5]]))
        .unwrap_err();
    assert!(
        err.to_string().contains("packing is for causal LM"),
        "{err}"
    );
}

/// Causal LM examples of different lengths with a masked prompt, as the chat data has them.
fn lm_examples() -> Vec<Example> {
    [7usize, 3, 5, 2, 6, 4]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids: Vec<i64> = (0..n as i64)
                .map(|k| 1 + (i as i64 * 13 + k * 7) % 127)
                .collect();
            // The first two tokens are the "prompt": no loss there.
            let labels = ids
                .iter()
                .enumerate()
                .map(|(k, &id)| if k < 2 { -100 } else { id })
                .collect();
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
        .collect()
}

/// One batch of every example, packed into rows of 9 or padded apart, takes the same loss and
/// gives the adapter the same gradients: packing changes the layout, not the training signal.
#[test]
fn packed_batch_trains_as_the_examples_apart() {
    let device = Device::flex().autodiff();
    let examples = lm_examples();
    let packed = pack(&examples, 9);
    assert!(packed.len() < examples.len(), "{} rows", packed.len());
    let run = |rows: &[Example]| {
        let model = with_lora("llama_gqa", &device);
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = collate(&refs, 0, &device);
        assert_eq!(
            batch.packed.is_some(),
            rows.iter().any(|e| !e.segments.is_empty())
        );
        let loss = forward_loss(model.model(), Task::CausalLm, &batch).unwrap();
        let value = loss.clone().into_scalar::<f32>();
        let grads = loss.backward();
        (value, adapter_grads(&model, "default", &grads))
    };
    let (apart_loss, apart_grads) = run(&examples);
    let (packed_loss, packed_grads) = run(&packed);
    // The same rows without their sequences attend across examples: another loss.
    let model = with_lora("llama_gqa", &device);
    let refs: Vec<&Example> = packed.iter().collect();
    let mut leaking = collate(&refs, 0, &device);
    leaking.packed = None;
    let leaked = forward_loss(model.model(), Task::CausalLm, &leaking)
        .unwrap()
        .into_scalar::<f32>();
    assert!(
        (leaked - apart_loss).abs() > 1e-3,
        "{leaked} vs {apart_loss}"
    );
    assert!(
        (apart_loss - packed_loss).abs() < 1e-5,
        "loss {apart_loss} apart, {packed_loss} packed"
    );
    assert_eq!(apart_grads.len(), packed_grads.len());
    for (name, g) in &apart_grads {
        let diff = max_rel_diff(&packed_grads[name], g);
        assert!(diff < 1e-5, "{name}: gradients differ by {diff}");
    }
}
