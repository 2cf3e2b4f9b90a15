//! One training step, in the pieces [`Trainer::train`](crate::Trainer::train) runs them and
//! the benchmarks time them (`benches/method_comparison`): forward and loss, backward into the
//! accumulated gradients, and the gradient scale (averaging over micro-batches, clipping) the
//! optimizer applies. One code path for both, so the benchmarks measure the trainer.

use burn::module::{Module, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use peft_core::nn::ForwardContext;
use peft_models::{HfModel, ModelInputs, Task};

use crate::data::Collated;
use crate::error::{Result, TrainError};
use crate::loss::{causal_lm_loss_terms, chunk_tokens, chunked_causal_lm_loss, objective_loss};
use crate::optim::global_grad_norm;

/// The model inputs of a collated batch (ids, attention mask, segment ids).
pub fn model_inputs(batch: &Collated) -> ModelInputs {
    ModelInputs {
        input_ids: batch.input_ids.clone(),
        attention_mask: Some(batch.attention_mask.clone()),
        token_type_ids: Some(batch.token_type_ids.clone()),
        pixel_values: batch.pixel_values.clone(),
    }
}

/// The forward context of a collated batch: the bounds of its ids as collation saw them, so
/// that the forward does not read the ids back from a GPU to check them ([`IdBounds`](peft_core::nn::IdBounds)),
/// and the examples of each packed row.
pub fn forward_context(batch: &Collated) -> ForwardContext {
    let fc = match batch.id_bounds {
        Some((ids, types)) => ForwardContext::default().with_id_bounds(ids, Some(types)),
        None => ForwardContext::default(),
    };
    match &batch.packed {
        Some(packed) => fc.with_packed(packed.clone()),
        None => fc,
    }
}

/// Forward `batch` through `model` and take `objective`'s mean loss ([`objective_loss`]). A
/// causal LM with a frozen head takes it over the vocabulary in chunks of tokens
/// ([`chunked_causal_lm_loss`]): the same loss and gradients without the whole batch's logits.
pub fn forward_loss(model: &HfModel, objective: Task, batch: &Collated) -> Result<Tensor<1>> {
    crate::objective::trainable_task(objective)?;
    if let (Task::CausalLm, Some(labels)) = (objective, batch.lm_labels.clone())
        && batch.input_ids.dims()[1] > 1
        && batch.input_ids.device().is_autodiff()
    {
        let fc = forward_context(batch);
        let hidden = model
            .lm_hidden_with(&model_inputs(batch), &fc)
            .map_err(TrainError::Model)?;
        if let Some((h, head)) = hidden {
            if head.is_frozen() {
                let chunk = chunk_tokens(model.vocab_size(), &head);
                return Ok(chunked_causal_lm_loss(h, &head, labels, chunk, &fc));
            }
            return Ok(causal_lm_loss_terms(head.logits(h, &fc), labels).0);
        }
    }
    let out = model
        .forward_with(&model_inputs(batch), &forward_context(batch))
        .map_err(TrainError::Model)?;
    // The step reads nothing back while it builds the graph: a causal LM's token count stays
    // on the device (`causal_lm_loss_terms`), where `objective_loss` would read it.
    if let (Task::CausalLm, Some(logits), Some(labels)) =
        (objective, out.logits.clone(), batch.lm_labels.clone())
    {
        return Ok(causal_lm_loss_terms(logits, labels).0);
    }
    Ok(objective_loss(objective, &out, batch)?.0)
}

/// Backpropagate `loss` and add the gradients of `model`'s parameters to `accumulator` (one
/// micro-batch of a step).
pub fn accumulate_gradients<M: Module>(
    loss: Tensor<1>,
    model: &M,
    accumulator: &mut GradientsAccumulator<M>,
) {
    let grads = GradientsParams::from_grads(loss.backward(), model);
    accumulator.accumulate(model, grads);
}

/// The global L2 norm of a step's gradients (summed over `micro_batches` micro-batches, then
/// averaged) and the factor the optimizer multiplies them by: `1 / micro_batches` times the
/// clip to `max_grad_norm`.
///
/// The clip is `torch.nn.utils.clip_grad_norm_`'s, which transformers' `Trainer` applies for
/// `max_grad_norm`: `max / (norm + 1e-6)` when the norm exceeds `max`, else 1.
///
/// ```
/// let grads = burn::optim::GradientsParams::new();
/// let (norm, scale) = peft_train::step::gradient_scale(&grads, &[], 2, Some(1.0));
/// assert_eq!((norm, scale), (0.0, 0.5));
/// ```
pub fn gradient_scale(
    grads: &GradientsParams,
    trainable: &[(ParamId, String, usize)],
    micro_batches: usize,
    max_grad_norm: Option<f64>,
) -> (f64, f64) {
    let scale = 1.0 / micro_batches as f64;
    let norm = global_grad_norm(grads, trainable) * scale;
    let clip = match max_grad_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    };
    (norm, scale * clip)
}
