//! Mixed-adapter batches at the sites (PEFT's `_mixed_batch_forward` in `tuners/lora/layer.py`
//! and `ModulesToSaveWrapper`): the frozen base runs once over the whole batch with the
//! original weights. The low-rank adapters (LoRA) then add their change to their rows in one
//! pass for all of them ([`peft_ops::mixed_lora`]); for every other adapter only its rows are
//! gathered (`select` on the batch dimension), the adapter's kernel runs on them, and the
//! change is added back (`select_assign` with `Add`). Rows of `__base__`, or of an adapter that
//! does not touch this site, keep the base output. A `modules_to_save` copy replaces the base
//! output of its adapter's rows; a kernel that transforms the GEMM's input (IA3 on feed-forward
//! layers) gets the GEMM recomputed for its rows only.

use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use crate::adapter::{AdapterState, BaseWeights};
use crate::nn::embedding::base_embedding;
use crate::nn::linear::base_linear;
use crate::nn::{Embedding, Linear, ModuleCopy, RowAdapters};

/// The adapter named `name` at a site, if it is attached and not merged.
fn live<'a>(adapters: &'a [AdapterState], name: &str) -> Option<&'a AdapterState> {
    adapters.iter().find(|a| a.name == name && !a.merged)
}

fn copy_of<'a>(copies: &'a [ModuleCopy], name: &str) -> Option<&'a ModuleCopy> {
    copies.iter().find(|c| c.adapter == name)
}

impl Linear {
    pub(crate) fn forward_mixed<const D: usize>(
        &self,
        input: Tensor<D>,
        rows: &RowAdapters,
    ) -> Tensor<D> {
        let [d_input, d_output] = self.dims();
        let mut out_shape = input.dims();
        out_shape[D - 1] = d_output;
        let batch = out_shape[0];
        assert_eq!(
            batch,
            rows.batch(),
            "a mixed batch names one adapter per row of dimension 0"
        );
        let per_row = input.shape().num_elements() / d_input / batch.max(1);
        let x = input.reshape([batch, per_row, d_input]);
        // A quantized base is dequantized only for the kernels of this batch that read it.
        let reads = rows
            .adapter_groups()
            .filter_map(|(name, _)| live(&self.adapters, name))
            .any(|a| a.kernel.reads_base_weight());
        let base = BaseWeights {
            weight: self.base_weight(reads),
            bias: self.bias.as_ref().map(|b| b.val()),
        };
        let flat = |t: Tensor<3>, n: usize, d: usize| t.reshape([n * per_row, d]);
        let x_rows = flat(x.clone(), batch, d_input);
        let y = self.base_product(x_rows.clone(), base.bias.clone());
        // Low-rank adapters (LoRA without active dropout): every row of all of them in one pass.
        let mut slots = vec![None; batch];
        let mut low_rank = Vec::new();
        for (name, group) in rows.adapter_groups() {
            let Some(adapter) = live(&self.adapters, name) else {
                continue;
            };
            if copy_of(&self.copies, name).is_some() || adapter.kernel.transforms_input(adapter) {
                continue;
            }
            if let Some(factors) = adapter.kernel.low_rank(adapter, &x_rows) {
                for &row in &group.rows {
                    slots[row] = Some(low_rank.len());
                }
                low_rank.push(factors);
            }
        }
        let y = if low_rank.is_empty() {
            y
        } else {
            peft_ops::mixed_lora(x_rows, y, &slots, &low_rank)
        };
        let mut y = y.reshape([batch, per_row, d_output]);
        for (name, group) in rows.adapter_groups() {
            let adapter = live(&self.adapters, name);
            let copy = copy_of(&self.copies, name);
            let done = group.rows.first().is_some_and(|&row| slots[row].is_some());
            if done || (adapter.is_none() && copy.is_none()) {
                continue;
            }
            let n = group.rows.len();
            let xg = flat(x.clone().select(0, group.index.clone()), n, d_input);
            let site = match copy {
                Some(c) => BaseWeights {
                    weight: c.weight.val(),
                    bias: c.bias.as_ref().map(|b| b.val()),
                },
                None => base.clone(),
            };
            let recompute = copy.is_some() || adapter.is_some_and(|a| a.kernel.transforms_input(a));
            // Additive adapters (LoRA): add their change to the rows, nothing to gather or diff.
            if !recompute
                && let Some(a) = adapter
                && let Some(delta) = a.kernel.linear_delta(a, &site, xg.clone())
            {
                let delta = delta.reshape([n, per_row, d_output]);
                y = y.select_assign(0, group.index.clone(), delta, IndexingUpdateOp::Add);
                continue;
            }
            let yg_base = flat(y.clone().select(0, group.index.clone()), n, d_output);
            let mut yg = if recompute {
                let x_in = match adapter {
                    Some(a) => a.kernel.transform_input(a, xg.clone()),
                    None => xg.clone(),
                };
                match copy {
                    Some(_) => base_linear(x_in, site.weight.clone(), site.bias.clone()),
                    None => self.base_product(x_in, site.bias.clone()),
                }
            } else {
                yg_base.clone()
            };
            if let Some(a) = adapter {
                yg = a.kernel.forward_linear(a, &site, xg, yg);
            }
            let delta = (yg - yg_base).reshape([n, per_row, d_output]);
            y = y.select_assign(0, group.index.clone(), delta, IndexingUpdateOp::Add);
        }
        y.reshape(out_shape)
    }
}

impl Embedding {
    pub(crate) fn forward_mixed(&self, input: Tensor<2, Int>, rows: &RowAdapters) -> Tensor<3> {
        let [batch, _] = input.dims();
        assert_eq!(
            batch,
            rows.batch(),
            "a mixed batch names one adapter per row of dimension 0"
        );
        let reads = rows
            .adapter_groups()
            .filter_map(|(name, _)| live(&self.adapters, name))
            .any(|a| a.kernel.reads_base_weight());
        let base = BaseWeights {
            weight: self.base_table(reads),
            bias: None,
        };
        let mut y = self.base_lookup(input.clone());
        for (name, group) in rows.adapter_groups() {
            let adapter = live(&self.adapters, name);
            let copy = copy_of(&self.copies, name);
            if adapter.is_none() && copy.is_none() {
                continue;
            }
            let ids = input.clone().select(0, group.index.clone());
            let yg_base = y.clone().select(0, group.index.clone());
            let site = match copy {
                Some(c) => BaseWeights {
                    weight: c.weight.val(),
                    bias: None,
                },
                None => base.clone(),
            };
            let mut yg = match copy {
                Some(_) => base_embedding(site.weight.clone(), ids.clone()),
                None => yg_base.clone(),
            };
            if let Some(a) = adapter {
                yg = a.kernel.forward_embedding(a, &site, ids, yg);
            }
            y = y.select_assign(0, group.index.clone(), yg - yg_base, IndexingUpdateOp::Add);
        }
        y
    }
}
