//! The training losses: one function per objective and [`objective_loss`], the dispatch the
//! training step, evaluation and the benchmarks share.

use burn::tensor::{Int, Tensor};
use peft_models::ModelOutputs;
use peft_ops::log_softmax;

use crate::data::Collated;
use crate::error::{Result, TrainError};
use crate::trainer::Objective;

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

/// The loss of `objective` on a forward's outputs: the mean loss and the number of items it
/// averages (examples for classification, scored tokens for causal LM). One function for the
/// training step, evaluation and the benchmarks.
pub fn objective_loss(
    objective: Objective,
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
        Objective::Classification { .. } => {
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
        Objective::CausalLm => {
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
    }
}
