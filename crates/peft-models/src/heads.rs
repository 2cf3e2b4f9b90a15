//! Task heads shared by the architectures.

use burn::tensor::{Int, Tensor};
use peft_core::nn::Embedding;

/// Logits through an output head tied to `embedding`: `h · Eᵀ` (through the quantized kernel
/// when the table is quantized).
pub fn tied_logits(h: Tensor<3>, embedding: &Embedding) -> Tensor<3> {
    let [b, s, d] = h.dims();
    let logits = embedding.tied_logits(h.reshape([b * s, d]));
    let vocab = logits.dims()[1];
    logits.reshape([b, s, vocab])
}

/// Pick, for each row, the logits at its last non-pad token, as transformers'
/// `*ForSequenceClassification` decoders do (`(arange * (ids != pad)).argmax(-1)`; without a pad
/// token, the last position).
pub fn pool_last_non_pad(
    logits: Tensor<3>,
    input_ids: &Tensor<2, Int>,
    pad: Option<i64>,
) -> Tensor<2> {
    let [b, s, c] = logits.dims();
    let device = logits.device();
    let index = match pad {
        Some(pad) => {
            let non_pad = input_ids.clone().not_equal_elem(pad).int();
            let arange = Tensor::<1, Int>::arange(0..s as i64, &device).reshape([1, s]);
            (non_pad * arange).argmax(1)
        }
        None => Tensor::<2, Int>::full([b, 1], s as i64 - 1, &device),
    };
    let index = index.reshape([b, 1, 1]).expand([b, 1, c]);
    logits.gather(1, index).reshape([b, c])
}

/// Mask-aware mean pooling then L2 normalisation (sentence-transformers'
/// `Pooling(mean)` + `Normalize`, as all-MiniLM-L6-v2 uses).
pub fn mean_pool_normalize(hidden: Tensor<3>, attention_mask: &Tensor<2, Int>) -> Tensor<2> {
    let [b, s, _] = hidden.dims();
    let mask = attention_mask.clone().float().reshape([b, s, 1]);
    let summed = (hidden * mask.clone()).sum_dim(1).squeeze_dim::<2>(1);
    let counts = mask.sum_dim(1).squeeze_dim::<2>(1).clamp_min(1e-9);
    let mean = summed / counts;
    let norm = mean
        .clone()
        .powf_scalar(2.0)
        .sum_dim(1)
        .sqrt()
        .clamp_min(1e-12);
    mean / norm
}
