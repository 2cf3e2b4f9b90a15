//! What the trainer minimizes: an [`Objective`] says how a model's loss is computed on a batch
//! and how the model is evaluated. The model zoo's heads are objectives ([`Task`]: sequence
//! classification, causal LM); a hand-written model brings its own with [`classifier`],
//! [`causal_lm`] or [`loss_fn`], each built from a closure over the model's forward.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use peft_models::{HfModel, Task};
use peft_ops::log_softmax;

use crate::data::{Collated, Example, collate};
use crate::error::{Result, TrainError};
use crate::eval::{EvalReport, ExampleResult};
use crate::loss::{causal_lm_loss_terms, classification_loss};
use crate::metrics::{Mean, accuracy, macro_f1, perplexity};

/// How the trainer computes a model's loss on a batch, and evaluates it.
///
/// Implement it for a model of your own, or build one from a closure: [`classifier`] (logits
/// per example), [`causal_lm`] (logits per token) or [`loss_fn`] (any scalar loss). The model
/// zoo's [`Task`] implements it for [`HfModel`].
pub trait Objective<M: Module>: Send + Sync {
    /// The mean loss of `batch`: a graph to differentiate when `batch` lives on an autodiff
    /// device (training), a plain value otherwise (evaluation).
    fn loss(&self, model: &M, batch: &Collated) -> Result<Tensor<1>>;

    /// Evaluate `model` on `examples` in batches of `batch_size` on `device` (without
    /// autodiff), with dropout off. The default reports the mean loss, weighted by examples.
    fn evaluate(
        &self,
        model: &M,
        examples: &[Example],
        pad_id: i64,
        batch_size: usize,
        device: &Device,
    ) -> Result<EvalReport> {
        let model = model.valid();
        let mut loss = Mean::default();
        for (chunk, batch) in eval_batches(examples, pad_id, batch_size, device) {
            let value = self.loss(&model, &batch)?.into_scalar::<f64>();
            loss.add_weighted(value, chunk.len() as u64);
        }
        Ok(EvalReport {
            loss: loss.mean().unwrap_or(f64::NAN),
            ..Default::default()
        })
    }

    /// The metric that picks the best checkpoint when the config names none (`loss` unless
    /// the evaluation reports something better suited, such as `accuracy`).
    fn default_metric(&self) -> &'static str {
        "loss"
    }

    /// What it is, for the run record (`run.json`): a resumed run must use the same objective.
    fn describe(&self) -> String;
}

/// `examples` in collated batches of `batch_size` on `device` without autodiff, each with its
/// examples: the loop of every evaluation.
pub fn eval_batches<'a>(
    examples: &'a [Example],
    pad_id: i64,
    batch_size: usize,
    device: &Device,
) -> impl Iterator<Item = (&'a [Example], Collated)> + 'a {
    let device = device.clone().without_autodiff();
    examples.chunks(batch_size.max(1)).map(move |chunk| {
        let refs: Vec<&Example> = chunk.iter().collect();
        (chunk, collate(&refs, pad_id, &device))
    })
}

/// The zoo's objectives: sequence classification and causal LM on [`HfModel`] (an encoder or
/// `Auto` has no loss and is refused).
impl Objective<HfModel> for Task {
    fn loss(&self, model: &HfModel, batch: &Collated) -> Result<Tensor<1>> {
        crate::step::forward_loss(model, *self, batch)
    }

    fn evaluate(
        &self,
        model: &HfModel,
        examples: &[Example],
        pad_id: i64,
        batch_size: usize,
        device: &Device,
    ) -> Result<EvalReport> {
        crate::eval::evaluate(model, examples, *self, pad_id, batch_size, device)
    }

    fn default_metric(&self) -> &'static str {
        match self {
            Task::SequenceClassification { .. } => "accuracy",
            _ => "loss",
        }
    }

    fn describe(&self) -> String {
        // The spelling of run records written before objectives were a trait, so that those
        // runs still resume.
        match self {
            Task::SequenceClassification { num_labels } => {
                format!("Classification {{ num_labels: {num_labels} }}")
            }
            Task::CausalLm => "CausalLm".into(),
            other => format!("{other:?}"),
        }
    }
}

/// The task's loss needs a head the zoo model may not have: an encoder has none.
pub(crate) fn trainable_task(task: Task) -> Result<()> {
    match task {
        Task::SequenceClassification { .. } | Task::CausalLm => Ok(()),
        other => Err(TrainError::Config {
            key: "objective".into(),
            reason: format!(
                "the task {other:?} has no loss; train with Task::SequenceClassification or \
                 Task::CausalLm"
            ),
        }),
    }
}

/// Cross-entropy over class logits `[batch, classes]` that `logits` computes from a batch (its
/// `labels` are the classes); evaluation adds accuracy and macro-F1 and picks the best
/// checkpoint by accuracy.
///
/// ```
/// use burn::tensor::Tensor;
/// use peft_train::data::Collated;
/// use peft_train::objective::{Objective, classifier};
/// # #[derive(burn::module::Module, Debug)] struct Model { w: burn::module::Param<Tensor<2>> }
/// # impl Model { fn logits(&self, ids: burn::tensor::Tensor<2, burn::tensor::Int>) -> Tensor<2> {
/// #   let [b, _] = ids.dims(); Tensor::zeros([b, 2], &ids.device()) + self.w.val() } }
/// let objective = classifier(|model: &Model, batch: &Collated| model.logits(batch.input_ids.clone()));
/// assert_eq!(objective.default_metric(), "accuracy");
/// ```
pub fn classifier<M, F>(logits: F) -> Classifier<F>
where
    M: Module,
    F: Fn(&M, &Collated) -> Tensor<2> + Send + Sync,
{
    Classifier { logits }
}

/// Next-token cross-entropy over logits `[batch, seq, vocab]` that `logits` computes from a
/// batch, on the tokens whose label (`Example::labels`) is not -100; evaluation adds
/// perplexity.
pub fn causal_lm<M, F>(logits: F) -> CausalLm<F>
where
    M: Module,
    F: Fn(&M, &Collated) -> Tensor<3> + Send + Sync,
{
    CausalLm { logits }
}

/// Any scalar loss `loss` computes from a model and a batch (a regression, a contrastive
/// loss, ...); evaluation reports its mean.
pub fn loss_fn<M, F>(name: &str, loss: F) -> LossFn<F>
where
    M: Module,
    F: Fn(&M, &Collated) -> Tensor<1> + Send + Sync,
{
    LossFn {
        name: name.to_string(),
        loss,
    }
}

/// A classification objective over a closure ([`classifier`]).
pub struct Classifier<F> {
    logits: F,
}

/// A causal-LM objective over a closure ([`causal_lm`]).
pub struct CausalLm<F> {
    logits: F,
}

/// A scalar loss from a closure ([`loss_fn`]).
pub struct LossFn<F> {
    name: String,
    loss: F,
}

fn missing(what: &str) -> TrainError {
    TrainError::Config {
        key: "objective".into(),
        reason: format!("{what}: every training example needs one for this objective"),
    }
}

impl<M, F> Objective<M> for Classifier<F>
where
    M: Module,
    F: Fn(&M, &Collated) -> Tensor<2> + Send + Sync,
{
    fn loss(&self, model: &M, batch: &Collated) -> Result<Tensor<1>> {
        let labels = batch
            .labels
            .clone()
            .ok_or_else(|| missing("the batch has no class labels (`Example::label`)"))?;
        Ok(classification_loss((self.logits)(model, batch), labels))
    }

    fn evaluate(
        &self,
        model: &M,
        examples: &[Example],
        pad_id: i64,
        batch_size: usize,
        device: &Device,
    ) -> Result<EvalReport> {
        let model = model.valid();
        let (mut loss, mut pred, mut gold) = (Mean::default(), Vec::new(), Vec::new());
        let (mut classes, mut per_example) = (0, Vec::with_capacity(examples.len()));
        for (chunk, batch) in eval_batches(examples, pad_id, batch_size, device) {
            let logits = (self.logits)(&model, &batch);
            classes = logits.dims()[1];
            let lp: Vec<f32> = log_softmax(logits.clone())
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            let argmax = logits.argmax(1).into_data().convert::<i64>();
            for (row, (e, p)) in chunk.iter().zip(argmax.iter::<i64>()).enumerate() {
                let log_probs = &lp[row * classes..(row + 1) * classes];
                let gold_class = e
                    .label
                    .ok_or_else(|| missing("an evaluation example has no class label"))?;
                let example_loss = -f64::from(*log_probs.get(gold_class).ok_or_else(|| {
                    missing(&format!(
                        "label {gold_class} is not one of the model's {classes} classes"
                    ))
                })?);
                loss.add_weighted(example_loss, 1);
                pred.push(p as usize);
                gold.push(gold_class);
                per_example.push(ExampleResult {
                    gold: Some(gold_class),
                    predicted: Some(p as usize),
                    probabilities: log_probs.iter().map(|v| v.exp()).collect(),
                    loss: Some(example_loss),
                    tokens: None,
                });
            }
        }
        Ok(EvalReport {
            loss: loss.mean().unwrap_or(f64::NAN),
            accuracy: Some(accuracy(&pred, &gold)),
            macro_f1: Some(macro_f1(&pred, &gold, classes)),
            perplexity: None,
            predictions: pred,
            examples: per_example,
        })
    }

    fn default_metric(&self) -> &'static str {
        "accuracy"
    }

    fn describe(&self) -> String {
        "Classifier".into()
    }
}

impl<M, F> Objective<M> for CausalLm<F>
where
    M: Module,
    F: Fn(&M, &Collated) -> Tensor<3> + Send + Sync,
{
    fn loss(&self, model: &M, batch: &Collated) -> Result<Tensor<1>> {
        let labels: Tensor<2, Int> = batch
            .lm_labels
            .clone()
            .ok_or_else(|| missing("the batch has no token labels (`Example::labels`)"))?;
        if labels.dims()[1] < 2 {
            return Err(missing("a causal LM batch needs two tokens or more"));
        }
        Ok(causal_lm_loss_terms((self.logits)(model, batch), labels).0)
    }

    fn evaluate(
        &self,
        model: &M,
        examples: &[Example],
        pad_id: i64,
        batch_size: usize,
        device: &Device,
    ) -> Result<EvalReport> {
        let model = model.valid();
        let mut loss = Mean::default();
        for (_, batch) in eval_batches(examples, pad_id, batch_size, device) {
            let labels = batch
                .lm_labels
                .clone()
                .ok_or_else(|| missing("an evaluation example has no token labels"))?;
            if labels.dims()[1] < 2 {
                continue;
            }
            let (mean, count) = causal_lm_loss_terms((self.logits)(&model, &batch), labels);
            let count = count.into_scalar::<f64>();
            // Token-weighted, as the zoo's causal-LM evaluation.
            loss.add_weighted(mean.into_scalar::<f64>(), count.max(0.0) as u64);
        }
        let mean = loss.mean().unwrap_or(f64::NAN);
        Ok(EvalReport {
            loss: mean,
            perplexity: Some(perplexity(mean)),
            ..Default::default()
        })
    }

    fn describe(&self) -> String {
        "CausalLm (closure)".into()
    }
}

impl<M, F> Objective<M> for LossFn<F>
where
    M: Module,
    F: Fn(&M, &Collated) -> Tensor<1> + Send + Sync,
{
    fn loss(&self, model: &M, batch: &Collated) -> Result<Tensor<1>> {
        Ok((self.loss)(model, batch))
    }

    fn describe(&self) -> String {
        format!("loss {}", self.name)
    }
}
