//! The training losses: one function per objective and [`objective_loss`], the dispatch the
//! training step, evaluation and the benchmarks share.

use burn::tensor::{Int, Tensor};
use peft_core::nn::ForwardContext;
use peft_models::lm_head::LmHead;
use peft_models::{ModelOutputs, Task};
use peft_ops::log_softmax;

use crate::data::Collated;
use crate::error::{Result, TrainError};

/// Mean cross-entropy of `logits [b, c]` against `labels [b]`.
pub fn classification_loss(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let [b, _] = logits.dims();
    let lp = log_softmax(logits);
    lp.gather(1, labels.reshape([b, 1])).mean().neg()
}

/// Next-token cross-entropy of `logits [b, s, v]` against `labels [b, s]` (-100 = ignored),
/// shifted as transformers does; returns the mean loss and the number of scored tokens.
pub fn causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> (Tensor<1>, usize) {
    let (loss, count) = causal_lm_loss_terms(logits, labels);
    (loss, count.into_scalar::<f64>().max(1.0) as usize)
}

/// [`causal_lm_loss`] with the count of scored tokens left on the device: the training step
/// reads nothing back while it builds the graph.
pub fn causal_lm_loss_terms(logits: Tensor<3>, labels: Tensor<2, Int>) -> (Tensor<1>, Tensor<1>) {
    let [b, s, v] = logits.dims();
    let lp = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]));
    let target = labels.slice([0..b, 1..s]);
    let mask = target.clone().not_equal_elem(-100).float();
    let count = mask.clone().sum().detach();
    let picked = lp
        .gather(2, target.clamp_min(0).reshape([b, s - 1, 1]))
        .reshape([b, s - 1]);
    let total = (picked * mask).sum();
    ((total / count.clone().clamp_min(1.0)).neg(), count)
}

/// Tokens per chunk of [`chunked_causal_lm_loss`] for a vocabulary of `vocab` through `head`:
/// about 16 MiB of f32 logits a chunk, rounded up to whole passes of the few-rows product
/// ([`peft_ops::FEW_ROWS_PASS`], 64 rows: 128 tokens, 24 MiB, at SmolLM2's 49,152; at least
/// 64); 8 MiB for a quantized head (42 tokens; at least 16).
///
/// Each chunk's two head products read the whole head weight (113 MB at SmolLM2's size), so
/// small chunks pay that per few tokens; large ones hold more logits, log-probabilities and
/// gradients at once. SmolLM2-135M, one run each, alternating (tokens/s, peak MB):
///
/// | chunk | dense 2 x 128 | dense 1 x 128 | Q4_1 1 x 128 | Q4_1 4 x 128 |
/// | --- | --- | --- | --- | --- |
/// | 32 MiB | 281, 276 / 834 | 210 / 714 | 180, 183 / 268 | 227 / 469 |
/// | 16 MiB | 276, 280 / 787 | 241 / 691 | 179, 186 / 244 | 217 / 424 |
/// | 8 MiB | 257, 263 / 764 | 234 / 667 | 176, 178 / 219 | 212 / 401 |
///
/// A quantized head is there to save memory: 8 MiB keeps its 1 x 128 step at 0.33x the dense
/// step's peak (0.375x at 32 MiB) for 2-3% of its speed. A dense head's 16 MiB (85 tokens)
/// ran its forward in passes of 64 and 21 rows, each reading the whole table, and packed the
/// table three times for the backward: at 128 tokens (two chunks of whole passes) the head and
/// loss of a 2 x 128 step took 168-177 ms against 184-191, and the step 873-909 against
/// 902-950 (`benches/llm_profile.rs`, three alternating pairs), for 26 MB more peak (814
/// against 788).
pub fn chunk_tokens(vocab: usize, head: &LmHead<'_>) -> usize {
    let tokens = |bytes: usize| (bytes / (4 * vocab.max(1))).max(16);
    if head.is_quantized() {
        return tokens(8 << 20);
    }
    tokens(16 << 20).next_multiple_of(peft_ops::FEW_ROWS_PASS)
}

/// The positions that predict a next token, flattened: hidden states `[n, hidden]` of positions
/// `0..s-1` of every row, their targets `[n]` (the labels of `1..s`, transformers' shift) and
/// which of them are scored (`[n]`, 1 where the label is not -100).
struct NextTokens {
    hidden: Tensor<2>,
    target: Tensor<1, Int>,
    mask: Tensor<1>,
}

impl NextTokens {
    /// `None` when the rows have one position (nothing to predict).
    fn of(h: Tensor<3>, labels: Tensor<2, Int>) -> Option<Self> {
        let [b, s, d] = h.dims();
        let n = b * s.checked_sub(1).filter(|&p| p > 0)?;
        let target = labels.slice([0..b, 1..s]).reshape([n]);
        Some(Self {
            hidden: h.slice([0..b, 0..s - 1, 0..d]).reshape([n, d]),
            mask: target.clone().not_equal_elem(-100).float(),
            target,
        })
    }

    /// `log p(target)` of positions `start..start + rows`, 0 where not scored, from their
    /// hidden states `hidden` `[rows, hidden]` through `head`: one chunk's logits at a time.
    fn scored_log_probs(
        &self,
        hidden: Tensor<2>,
        start: usize,
        head: &LmHead<'_>,
        fc: &ForwardContext,
    ) -> Tensor<1> {
        let [rows, d] = hidden.dims();
        let logits = head.logits(hidden.reshape([1, rows, d]), fc);
        let vocab = logits.dims()[2];
        let target = self
            .target
            .clone()
            .narrow(0, start, rows)
            .clamp_min(0)
            .reshape([rows, 1]);
        log_softmax(logits.reshape([rows, vocab]))
            .gather(1, target)
            .reshape([rows])
            * self.mask.clone().narrow(0, start, rows)
    }
}

/// [`causal_lm_loss_terms`]'s mean loss from the final hidden states `h` `[b, s, hidden]`
/// through a frozen LM `head`, `chunk` tokens at a time: the `[tokens, vocab]` logits, their
/// log-softmax and their gradient never exist for more than one chunk (Liger's and Apple's
/// "cut cross-entropy" idea), which is most of a small model's step memory at a large
/// vocabulary. Each chunk's loss is differentiated on its own right away (the head is frozen:
/// the gradient goes only to `h`), and the returned loss carries the summed gradient into the
/// model: its value is the loss, its gradient `Σ g ⊙ ∂h/∂θ`. Needs an autodiff device and a
/// head with nothing trainable ([`LmHead::is_frozen`]).
pub fn chunked_causal_lm_loss(
    h: Tensor<3>,
    head: &LmHead<'_>,
    labels: Tensor<2, Int>,
    chunk: usize,
    fc: &ForwardContext,
) -> Tensor<1> {
    let Some(tokens) = NextTokens::of(h.clone(), labels) else {
        // One position: no next token to score (a zero loss that still reaches the model).
        return h.sum().mul_scalar(0.0);
    };
    let [n, d] = tokens.hidden.dims();
    let chunk = chunk.max(1);
    let count = tokens.mask.clone().sum().detach().clamp_min(1.0);
    let values = tokens.hidden.clone().inner();
    let mut grads = Vec::with_capacity(n.div_ceil(chunk));
    let mut total: Option<Tensor<1>> = None;
    for start in (0..n).step_by(chunk) {
        let end = (start + chunk).min(n);
        let leaf = Tensor::from_inner(values.clone().slice([start..end, 0..d])).require_grad();
        let loss = tokens
            .scored_log_probs(leaf.clone(), start, head, fc)
            .sum()
            .neg()
            / count.clone();
        let step = loss.backward();
        grads.push(
            leaf.grad(&step)
                .unwrap_or_else(|| values.zeros_like().slice([start..end, 0..d])),
        );
        let value = loss.inner();
        total = Some(match total {
            Some(t) => t + value,
            None => value,
        });
    }
    let total = total.unwrap_or_else(|| count.clone().inner().zeros_like());
    let surrogate = (tokens.hidden * Tensor::from_inner(Tensor::cat(grads, 0))).sum();
    // Value: the loss (the surrogate cancels); gradient: the surrogate's.
    surrogate.clone() - surrogate.detach() + Tensor::from_inner(total)
}

/// Per-row sums of the next-token log-likelihood and scored-token counts of hidden states `h`
/// `[b, s, hidden]` through a frozen LM `head`, `chunk` tokens at a time and without gradients
/// (evaluation): the `[b, s, vocab]` logits of a whole evaluation batch never exist at once.
/// Row `r`'s mean loss is `-sums[r] / counts[r]`.
pub fn causal_lm_row_sums_chunked(
    h: Tensor<3>,
    head: &LmHead<'_>,
    labels: Tensor<2, Int>,
    chunk: usize,
    fc: &ForwardContext,
) -> (Vec<f64>, Vec<usize>) {
    let [b, s, _] = h.dims();
    let per_row = s.saturating_sub(1);
    let (mut sums, mut counts) = (vec![0.0f64; b], vec![0usize; b]);
    let Some(tokens) = NextTokens::of(h, labels) else {
        return (sums, counts);
    };
    let n = tokens.hidden.dims()[0];
    let chunk = chunk.max(1);
    let host = |t: Tensor<1>| -> Vec<f64> {
        t.into_data()
            .convert::<f64>()
            .try_to_vec()
            .unwrap_or_default()
    };
    for start in (0..n).step_by(chunk) {
        let rows = (start + chunk).min(n) - start;
        let hidden = tokens.hidden.clone().narrow(0, start, rows);
        let picked = host(tokens.scored_log_probs(hidden, start, head, fc));
        let scored = host(tokens.mask.clone().narrow(0, start, rows));
        for (k, (p, c)) in picked.iter().zip(&scored).enumerate() {
            let row = (start + k) / per_row;
            sums[row] += p;
            counts[row] += *c as usize;
        }
    }
    (sums, counts)
}

/// The loss of `objective` on a forward's outputs: the mean loss and the number of items it
/// averages (examples for classification, scored tokens for causal LM). One function for the
/// training step, evaluation and the benchmarks.
pub fn objective_loss(
    objective: Task,
    out: &ModelOutputs,
    batch: &Collated,
) -> Result<(Tensor<1>, usize)> {
    let mismatch = |what: &str| TrainError::Config {
        key: "objective".into(),
        reason: format!(
            "{what}; train a classifier with a classification model and a causal LM with an LM head"
        ),
    };
    match objective {
        Task::SequenceClassification { .. } => {
            let logits = out
                .class_logits
                .clone()
                .ok_or_else(|| mismatch("the model has no classification head"))?;
            let labels = batch
                .labels
                .clone()
                .ok_or_else(|| mismatch("the batch has no class labels"))?;
            let rows = labels.dims()[0];
            Ok((classification_loss(logits, labels), rows))
        }
        Task::CausalLm => {
            let logits = out
                .logits
                .clone()
                .ok_or_else(|| mismatch("the model has no LM head"))?;
            let labels = batch
                .lm_labels
                .clone()
                .ok_or_else(|| mismatch("the batch has no token labels"))?;
            Ok(causal_lm_loss(logits, labels))
        }
        other => Err(mismatch(&format!("the task {other:?} has no loss"))),
    }
}

#[cfg(test)]
mod chunk_size_tests {
    use burn::tensor::Device;
    use peft_core::nn::{Embedding, EmbeddingConfig};
    use peft_models::lm_head::LmHead;
    use peft_models::quantized;
    use peft_ops::quant::{QuantFormat, QuantMatrix};

    use super::chunk_tokens;

    fn tied(embedding: &Embedding) -> LmHead<'_> {
        LmHead {
            linear: None,
            embedding,
            softcap: None,
        }
    }

    #[test]
    fn a_quantized_head_takes_smaller_chunks() {
        let device = Device::flex();
        let dense = EmbeddingConfig::new(256, 32).init(&device);
        let values: Vec<f32> = (0..256 * 32).map(|i| (i % 17) as f32 / 17.0).collect();
        let matrix = QuantMatrix::quantize(QuantFormat::Q8_0, &values, 256, 32).unwrap();
        let quant = Embedding::quantized(quantized::base(matrix), &device);
        assert!(!tied(&dense).is_quantized() && tied(&quant).is_quantized());
        // SmolLM2's vocabulary: 16 MiB of f32 logits rounded up to whole passes of 64 rows
        // (24 MiB), and 8 MiB.
        assert_eq!(chunk_tokens(49_152, &tied(&dense)), 128);
        assert_eq!(chunk_tokens(49_152, &tied(&quant)), 42);
        // At least 16 tokens, however large the vocabulary.
        assert_eq!(chunk_tokens(10_000_000, &tied(&quant)), 16);
        assert_eq!(chunk_tokens(10_000_000, &tied(&dense)), 64);
    }
}
