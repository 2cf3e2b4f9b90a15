//! Evaluation: mean loss and accuracy / macro-F1 (classification) or perplexity (causal LM),
//! with per-example results, without gradients or dropout.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor};
use peft_models::{HfModel, Task};
use peft_ops::log_softmax;
use serde::Serialize;

use crate::data::{Example, collate};
use crate::error::{Result, TrainError};
use crate::loss::{causal_lm_row_sums_chunked, chunk_tokens, objective_loss};
use crate::metrics::{Mean, accuracy, macro_f1, perplexity};
use crate::step::{forward_context, model_inputs};

/// Evaluation results.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct EvalReport {
    /// Mean loss.
    pub loss: f64,
    /// Accuracy (classification).
    pub accuracy: Option<f64>,
    /// Macro-F1 (classification).
    pub macro_f1: Option<f64>,
    /// Perplexity (causal LM).
    pub perplexity: Option<f64>,
    /// Predicted class per example (classification).
    #[serde(skip)]
    pub predictions: Vec<usize>,
    /// Per-example results, in the order of the examples.
    #[serde(skip)]
    pub examples: Vec<ExampleResult>,
}

/// One example's evaluation result (`burn-peft eval --predictions`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ExampleResult {
    /// The gold class (classification).
    pub gold: Option<usize>,
    /// The predicted class (classification).
    pub predicted: Option<usize>,
    /// Class probabilities (classification).
    pub probabilities: Vec<f32>,
    /// This example's loss: cross-entropy of the gold class, or the mean next-token loss.
    pub loss: Option<f64>,
    /// Scored tokens (causal LM).
    pub tokens: Option<usize>,
}

impl EvalReport {
    /// The value of `metric` and whether higher is better.
    pub fn metric(&self, metric: &str) -> Option<(f64, bool)> {
        match metric {
            "accuracy" => self.accuracy.map(|v| (v, true)),
            "macro_f1" => self.macro_f1.map(|v| (v, true)),
            "perplexity" => self.perplexity.map(|v| (v, false)),
            "loss" => Some((self.loss, false)),
            _ => None,
        }
    }
}

/// Evaluate `model` on `examples` in batches of `batch_size`, without gradients or dropout:
/// mean loss, and accuracy / macro-F1 (classification) or perplexity (causal LM), with the
/// per-example results in [`EvalReport::examples`].
pub fn evaluate(
    model: &HfModel,
    examples: &[Example],
    objective: Task,
    pad_id: i64,
    batch_size: usize,
    device: &Device,
) -> Result<EvalReport> {
    crate::objective::trainable_task(objective)?;
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let mut loss = Mean::default();
    let (mut pred, mut gold) = (Vec::new(), Vec::new());
    let mut per_example = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, &device);
        // A causal LM with a frozen head: the loss over the vocabulary a few tokens at a time,
        // never the whole batch's `[b, s, vocab]` logits.
        if let (Task::CausalLm, Some(labels)) = (objective, batch.lm_labels.clone()) {
            let fc = forward_context(&batch);
            let hidden = model
                .lm_hidden_with(&model_inputs(&batch), &fc)
                .map_err(TrainError::Model)?;
            if let Some((h, head)) = hidden.filter(|(_, head)| head.is_frozen()) {
                let chunk_size = chunk_tokens(model.vocab_size(), &head);
                let (sums, counts) = causal_lm_row_sums_chunked(h, &head, labels, chunk_size, &fc);
                let (total, scored): (f64, usize) = (sums.iter().sum(), counts.iter().sum());
                loss.add_weighted(-total / scored.max(1) as f64, scored.max(1) as u64);
                for (sum, c) in sums.into_iter().zip(counts) {
                    per_example.push(ExampleResult {
                        gold: None,
                        predicted: None,
                        probabilities: Vec::new(),
                        loss: (c > 0).then(|| -sum / c as f64),
                        tokens: Some(c),
                    });
                }
                continue;
            }
        }
        let out = model
            .forward_with(&model_inputs(&batch), &forward_context(&batch))
            .map_err(TrainError::Model)?;
        let (l, n) = objective_loss(objective, &out, &batch)?;
        loss.add_weighted(l.into_scalar::<f64>(), n as u64);
        match objective {
            Task::SequenceClassification { .. } => {
                let logits = out.class_logits.expect("checked by objective_loss");
                let probs = softmax(logits.clone(), 1)
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap_or_default();
                let lp = log_softmax(logits.clone())
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap_or_default();
                let classes = logits.dims()[1];
                let p = logits.argmax(1).into_data().convert::<i64>();
                for (row, (e, predicted)) in chunk.iter().zip(p.iter::<i64>()).enumerate() {
                    let predicted = predicted as usize;
                    let probabilities = probs[row * classes..(row + 1) * classes].to_vec();
                    let example_loss = e.label.map(|g| -f64::from(lp[row * classes + g]));
                    pred.push(predicted);
                    gold.push(e.label.unwrap_or(0));
                    per_example.push(ExampleResult {
                        gold: e.label,
                        predicted: Some(predicted),
                        probabilities,
                        loss: example_loss,
                        tokens: None,
                    });
                }
            }
            _ => {
                let logits = out.logits.expect("checked by objective_loss");
                let labels = batch.lm_labels.clone().expect("checked by objective_loss");
                let (losses, counts) = causal_lm_row_losses(logits, labels);
                for (l, c) in losses.into_iter().zip(counts) {
                    per_example.push(ExampleResult {
                        gold: None,
                        predicted: None,
                        probabilities: Vec::new(),
                        loss: (c > 0).then_some(l),
                        tokens: Some(c),
                    });
                }
            }
        }
    }
    let mean = loss.mean().unwrap_or(f64::NAN);
    Ok(match objective {
        Task::SequenceClassification { num_labels } => EvalReport {
            loss: mean,
            accuracy: Some(accuracy(&pred, &gold)),
            macro_f1: Some(macro_f1(&pred, &gold, num_labels)),
            perplexity: None,
            predictions: pred,
            examples: per_example,
        },
        _ => EvalReport {
            loss: mean,
            perplexity: Some(perplexity(mean)),
            examples: per_example,
            ..Default::default()
        },
    })
}

/// Per-row mean next-token loss and scored-token count (for per-example reports).
fn causal_lm_row_losses(logits: Tensor<3>, labels: Tensor<2, Int>) -> (Vec<f64>, Vec<usize>) {
    let [b, s, v] = logits.dims();
    if s < 2 {
        return (vec![0.0; b], vec![0; b]);
    }
    let lp = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]));
    let target = labels.slice([0..b, 1..s]);
    let mask = target.clone().not_equal_elem(-100).float();
    let picked = lp
        .gather(2, target.clamp_min(0).reshape([b, s - 1, 1]))
        .reshape([b, s - 1]);
    let sums = (picked * mask.clone())
        .sum_dim(1)
        .into_data()
        .convert::<f64>();
    let counts = mask.sum_dim(1).into_data().convert::<f64>();
    let sums: Vec<f64> = sums.try_to_vec().unwrap_or_default();
    let counts: Vec<f64> = counts.try_to_vec().unwrap_or_default();
    sums.iter()
        .zip(&counts)
        .map(|(t, c)| {
            if *c > 0.0 {
                (-t / c, *c as usize)
            } else {
                (0.0, 0)
            }
        })
        .unzip()
}
