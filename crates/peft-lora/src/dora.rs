//! DoRA (Liu et al., 2024, "Weight-Decomposed Low-Rank Adaptation"), as Hugging Face PEFT 0.21.2
//! computes it (`peft/tuners/lora/dora.py`, `DoraLinearVariant` / `DoraEmbeddingVariant` in
//! `peft/tuners/lora/variants.py`).
//!
//! The adapted weight is `m · (W + s·ΔW) / ‖W + s·ΔW‖`, the norm taken per output feature (over
//! the input features of a linear layer, over the vocabulary of an embedding table), with `ΔW`
//! LoRA's low-rank product and `m` the learned magnitude (`lora_magnitude_vector` in the bundle).
//! As in the paper (§4.3) and PEFT, the norm is detached: it follows `ΔW` but takes no gradient.
//! In Burn layout both weights are `[in, out]` / `[vocab, dim]`, so every norm runs over axis 0
//! and GPT-2's `Conv1D` needs nothing special (`fan_in_fan_out` only concerns the file layout).

use std::sync::Arc;

use burn::tensor::module::embedding;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use peft_core::{
    AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, PeftError, Result,
    SiteInfo, TensorSource, WeightSpace,
};

use crate::kernel::{LoraEmbeddingKernel, LoraLinearKernel, delta, linear_weight_space};

/// Bundle name of the magnitude, relative to the site (PEFT strips the `.weight` of its
/// `DoraLinearLayer` when saving: `LoraModel._get_adapter_state_dict`).
pub const MAGNITUDE_KEY: &str = "lora_magnitude_vector";

/// `‖weight + delta‖` per column (axis 0), `[1, cols]`, detached from the autodiff graph. A
/// half-precision frozen base (`peft_core::precision`) is widened to the adapter's precision.
pub(crate) fn column_norm(weight: Tensor<2>, delta: Tensor<2>) -> Tensor<2> {
    (weight.detach().cast(delta.dtype()) + delta.detach())
        .square()
        .sum_dim(0)
        .sqrt()
        .detach()
}

/// `m / ‖W + s·A·B‖` as a `[1, out]` row (the gradient reaches `m` only). `A·B` is formed from
/// detached copies, so autodiff records nothing for the norm.
pub(crate) fn magnitude_scale(state: &AdapterState, weight: &Tensor<2>, scaling: f64) -> Tensor<2> {
    let a = state.matrices[0].val().detach();
    let b = state.matrices[1].val().detach();
    let norm = column_norm(weight.clone(), a.matmul(b).mul_scalar(scaling));
    state.vectors[0].val().unsqueeze::<2>() / norm
}

/// The magnitude a fresh adapter starts with: the column norms of `W + s·A·B`, so that at
/// initialization DoRA computes exactly what LoRA does (PEFT's `DoraLinearLayer.update_layer`).
pub(crate) fn initial_magnitude(
    site: &SiteInfo,
    a: &Tensor<2>,
    b: &Tensor<2>,
    scaling: f64,
) -> Result<Tensor<1>> {
    let base = site
        .base
        .as_ref()
        .ok_or_else(|| PeftError::UnsupportedSite {
            path: site.path.clone(),
            kind: site.kind.name().into(),
            method: "LORA (use_dora)".into(),
        })?;
    let delta = a.clone().matmul(b.clone()).mul_scalar(scaling);
    Ok(column_norm(base.weight.clone(), delta).squeeze_dim::<1>(0))
}

/// Fold the adapter into `site.current` (`W' = (W + ΔW) · m / ‖W₀ + ΔW‖`, with `W₀` the base
/// without other merged adapters, as PEFT's `merge_safe`) or take it out again with the norm kept
/// at merge time (`W = W' / (m / ‖·‖) - ΔW`: the merged weight no longer knows the norm).
/// `layout_delta` is `A·B·s` in the weight's layout.
pub(crate) fn merge_dora(
    state: &mut AdapterState,
    site: MergeInput<'_>,
    direction: MergeDirection,
    layout_delta: Tensor<2>,
) -> Result<BaseWeights> {
    let magnitude = state.vectors[0].val().detach().unsqueeze::<2>();
    let device = site.current.weight.device();
    let weight = match direction {
        MergeDirection::Merge => {
            let unmerged = site.unmerged()?;
            let norm = column_norm(unmerged.weight, layout_delta.clone());
            state.merge_cache = Some(norm.clone().into_data());
            (site.current.weight + layout_delta) * (magnitude / norm)
        }
        MergeDirection::Unmerge => {
            let norm = state.merge_cache.take().ok_or_else(|| {
                PeftError::InvalidState(format!(
                    "DoRA adapter `{}` is not merged: no weight norm was kept to unmerge it",
                    state.name
                ))
            })?;
            let norm = Tensor::<2>::from_data(norm, &device);
            site.current.weight / (magnitude / norm) - layout_delta
        }
    };
    Ok(BaseWeights {
        weight,
        bias: site.current.bias,
    })
}

/// DoRA in weight space: `(weight + s·A·B) · m / ‖base + s·A·B‖`, the norm detached. The
/// activation forward (PEFT's `DoraLinearLayer.forward`) is `scale ⊙ (x·(W + ΔW))` plus the
/// bias, with `scale` built the same way from the stored base weight, so outputs and gradients
/// agree.
pub(crate) fn dora_weight(
    state: &AdapterState,
    base: &Tensor<2>,
    weight: Tensor<2>,
    scaling: f64,
) -> Tensor<2> {
    let scale = magnitude_scale(state, base, scaling);
    (weight + delta(state, scaling)) * scale
}

/// Read the magnitude of `state` (`vectors[0]`, `[out]`) from `source`.
pub(crate) fn import_magnitude(
    mut state: AdapterState,
    source: &mut dyn TensorSource,
) -> Result<AdapterState> {
    let dims = state.vectors[0].dims();
    let data = source.take(MAGNITUDE_KEY, &dims)?;
    state.set_vector(0, data);
    Ok(state)
}

/// Inverted dropout on the adapter input, as `torch.nn.Dropout` in training.
fn dropout(x: Tensor<2>, p: f64) -> Tensor<2> {
    let keep = 1.0 - p;
    let mask = x.random_like(Distribution::Bernoulli(keep));
    (x * mask).div_scalar(keep)
}

/// The DoRA output of a linear site: `y + (scale - 1)·base_result + scale·lora_result`, with
/// `scale = m / ‖W + ΔW‖` (PEFT's `DoraLinearLayer.forward`). `base_result` is the base product
/// without bias for the input `lora_result` was computed from.
fn dora_output(
    y: Tensor<2>,
    scale: Tensor<2>,
    base_result: Tensor<2>,
    lora_result: Tensor<2>,
) -> Tensor<2> {
    y + (scale.clone() - 1.0) * base_result + scale * lora_result
}

/// DoRA on a linear layer. The state is LoRA's (`matrices = [A [in, r], B [r, out]]`) plus
/// `vectors = [m [out]]`.
#[derive(Debug)]
pub struct DoraLinearKernel {
    /// The LoRA part (scaling, dropout, rank, file names of A and B).
    pub lora: LoraLinearKernel,
}

impl DoraLinearKernel {
    /// A fresh adapter state for `site` from LoRA's `a` and `b`, with the magnitude at the column
    /// norms of `W + s·A·B`.
    pub fn adapter(
        self,
        name: &str,
        site: &SiteInfo,
        a: Tensor<2>,
        b: Tensor<2>,
    ) -> Result<AdapterState> {
        let m = initial_magnitude(site, &a, &b, self.lora.scaling)?;
        Ok(AdapterState::new(name, vec![a, b], vec![m], Arc::new(self)))
    }
}

impl AdapterKernel for DoraLinearKernel {
    fn forward_linear(
        &self,
        state: &AdapterState,
        base: &BaseWeights,
        x: Tensor<2>,
        y: Tensor<2>,
    ) -> Tensor<2> {
        let scaling = self.lora.scaling;
        let scale = magnitude_scale(state, &base.weight, scaling);
        // PEFT (`DoraLinearVariant.forward`): with dropout active the base product is recomputed
        // on the dropped input (an extra GEMM, without bias); otherwise it is the output so far
        // minus the bias, which includes the adapters before this one.
        let (x, base_result) = if self.lora.dropout > 0.0 && state.is_training(&x) {
            let x = dropout(x, self.lora.dropout);
            let base_result = x.clone().matmul(base.weight.clone().cast(x.dtype()));
            (x, base_result)
        } else {
            let base_result = match &base.bias {
                Some(bias) => y.clone() - bias.clone().unsqueeze::<2>(),
                None => y.clone(),
            };
            (x, base_result)
        };
        let lora_result = x
            .matmul(state.matrices[0].val())
            .matmul(state.matrices[1].val())
            .mul_scalar(scaling);
        dora_output(y, scale, base_result, lora_result)
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        let layout_delta = delta(state, self.lora.scaling);
        merge_dora(state, site, direction, layout_delta)
    }

    fn weight_space(&self) -> WeightSpace {
        linear_weight_space(self.lora.dropout)
    }

    fn effective_weight(
        &self,
        state: &AdapterState,
        base: &Tensor<2>,
        weight: Tensor<2>,
    ) -> Tensor<2> {
        dora_weight(state, base, weight, self.lora.scaling)
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        let mut tensors = self.lora.export(state);
        tensors.push((MAGNITUDE_KEY.into(), state.vectors[0].val().into_data()));
        tensors
    }

    fn import(&self, state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState> {
        let state = self.lora.import(state, source)?;
        import_magnitude(state, source)
    }
}

/// DoRA on an embedding table (PEFT's `DoraEmbeddingLayer`): the norm runs over the vocabulary,
/// one per embedding dimension, and the lookup is rescaled:
/// `y' = scale ⊙ y + scale ⊙ embedding(ids, A)·B·s`. No dropout, as for LoRA embeddings.
#[derive(Debug)]
pub struct DoraEmbeddingKernel {
    /// The LoRA part (scaling, file names of A and B).
    pub lora: LoraEmbeddingKernel,
}

impl DoraEmbeddingKernel {
    /// A fresh adapter state for `site` from LoRA's `a` `[vocab, r]` and `b` `[r, dim]`.
    pub fn adapter(
        self,
        name: &str,
        site: &SiteInfo,
        a: Tensor<2>,
        b: Tensor<2>,
    ) -> Result<AdapterState> {
        let m = initial_magnitude(site, &a, &b, self.lora.scaling)?;
        Ok(AdapterState::new(name, vec![a, b], vec![m], Arc::new(self)))
    }
}

impl AdapterKernel for DoraEmbeddingKernel {
    fn forward_embedding(
        &self,
        state: &AdapterState,
        base: &BaseWeights,
        ids: Tensor<2, Int>,
        y: Tensor<3>,
    ) -> Tensor<3> {
        let scale = magnitude_scale(state, &base.weight, self.lora.scaling).unsqueeze::<3>();
        let low = embedding(state.matrices[0].val(), ids);
        let lora_result = low
            .matmul(state.matrices[1].val().unsqueeze::<3>())
            .mul_scalar(self.lora.scaling);
        scale.clone() * y + scale * lora_result
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        let layout_delta = delta(state, self.lora.scaling);
        merge_dora(state, site, direction, layout_delta)
    }

    /// Exact: `scale ⊙ embedding(ids, W + ΔW)` is a lookup in `(W + ΔW) · scale`.
    fn weight_space(&self) -> WeightSpace {
        WeightSpace::Exact
    }

    fn effective_weight(
        &self,
        state: &AdapterState,
        base: &Tensor<2>,
        weight: Tensor<2>,
    ) -> Tensor<2> {
        dora_weight(state, base, weight, self.lora.scaling)
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        let mut tensors = self.lora.export(state);
        tensors.push((MAGNITUDE_KEY.into(), state.vectors[0].val().into_data()));
        tensors
    }

    fn import(&self, state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState> {
        let state = self.lora.import(state, source)?;
        import_magnitude(state, source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn close(a: Tensor<2>, b: Tensor<2>) -> f32 {
        let (a, b) = (
            a.into_data().try_to_vec::<f32>().unwrap(),
            b.into_data().try_to_vec::<f32>().unwrap(),
        );
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The two ways PEFT gets the base product (the output so far minus the bias, or a fresh
    /// GEMM on the dropped input) agree when the dropout mask keeps everything, so the dropout
    /// path computes the same function on its input as the inference path.
    #[test]
    fn dropout_path_and_inference_path_agree_on_the_same_input() {
        let device = Device::flex();
        device.seed(5);
        let w = Tensor::<2>::random([6, 4], Distribution::Normal(0.0, 1.0), &device);
        let bias = Tensor::<1>::random([4], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<2>::random([3, 6], Distribution::Normal(0.0, 1.0), &device);
        let scale = Tensor::<2>::random([1, 4], Distribution::Uniform(0.5, 1.5), &device);
        let lora = Tensor::<2>::random([3, 4], Distribution::Normal(0.0, 1.0), &device);
        let y = x.clone().matmul(w.clone()) + bias.clone().unsqueeze::<2>();
        let from_output = dora_output(
            y.clone(),
            scale.clone(),
            y.clone() - bias.unsqueeze::<2>(),
            lora.clone(),
        );
        let recomputed = dora_output(y, scale, x.matmul(w), lora);
        assert!(close(from_output, recomputed) < 1e-5);
    }

    #[test]
    fn column_norm_is_per_output_feature() {
        let device = Device::flex();
        let w = Tensor::<2>::from_floats([[3.0, 0.0], [4.0, 1.0]], &device);
        let norm = column_norm(w.clone(), w.zeros_like());
        assert_eq!(norm.dims(), [1, 2]);
        assert_eq!(
            norm.into_data().try_to_vec::<f32>().unwrap(),
            vec![5.0, 1.0]
        );
    }

    /// In training with dropout the DoRA output is linear in the dropped input, and inverted
    /// dropout keeps its mean: averaged over many independently dropped copies of one row, the
    /// training output approaches the inference output of that row.
    #[test]
    fn dropout_path_averages_to_the_inference_output() {
        use peft_core::nn::Linear;
        let device = Device::flex().autodiff();
        let (d_in, d_out, r, rows) = (6, 4, 2, 20_000);
        let w = Tensor::<2>::random([d_in, d_out], Distribution::Normal(0.0, 1.0), &device);
        let bias = Tensor::<1>::random([d_out], Distribution::Normal(0.0, 1.0), &device);
        let a = Tensor::<2>::random([d_in, r], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<2>::random([r, d_out], Distribution::Normal(0.0, 1.0), &device);
        let m = Tensor::<1>::random([d_out], Distribution::Uniform(1.0, 3.0), &device);
        let kernel = DoraLinearKernel {
            lora: LoraLinearKernel {
                scaling: 2.0,
                dropout: 0.3,
                r,
            },
        };
        let mut layer = Linear::from_tensors(w, Some(bias));
        let state = AdapterState::new("default", vec![a, b], vec![m], Arc::new(kernel));
        layer.adapters.push(state);
        let row = Tensor::<2>::random([1, d_in], Distribution::Normal(0.0, 1.0), &device);
        let train = layer.forward(row.clone().repeat_dim(0, rows));
        let mean = train.clone().mean_dim(0);
        layer.adapters[0].training = burn::module::Param::from_bool(false);
        let eval = layer.forward(row);
        let spread = (train - eval.clone()).abs().max().into_scalar::<f32>();
        assert!(spread > 0.1, "dropout should change single rows");
        let diff = (mean - eval.clone()).abs().max().into_scalar::<f32>();
        let size = eval.abs().max().into_scalar::<f32>();
        assert!(
            diff < 0.05 * size.max(1.0),
            "mean {diff} off (output size {size})"
        );
    }
}
