//! The active set at the sites: which adapters and `modules_to_save` copies compute, which
//! parameters train as a result, and per-row adapters (mixed batches).

use std::collections::HashSet;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::Tensor;

use super::PeftModel;
use crate::adaptable::Adaptable;
use crate::error::{PeftError, Result};
use crate::method::BiasMode;
use crate::nn::{BASE_ROW, ForwardContext, RowAdapters};
use crate::registry::rules;

struct FreezeAll;

impl ModuleMapper for FreezeAll {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad(false)
    }
}

/// Marks every float parameter trainable and records its id.
struct TrainAll<'a> {
    ids: &'a mut HashSet<ParamId>,
}

impl ModuleMapper for TrainAll<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let param = param.set_require_grad(true);
        self.ids.insert(param.id);
        param
    }
}

fn train_param<const D: usize>(param: &mut Param<Tensor<D>>, ids: &mut HashSet<ParamId>) {
    *param = param.clone().set_require_grad(true);
    ids.insert(param.id);
}

impl<M: Adaptable + Module> PeftModel<M> {
    /// A forward context that runs a different adapter on each row of a batch (PEFT's
    /// `adapter_names=[...]`): `names[i]` is row `i`'s adapter, [`BASE_ROW`] (`"__base__"`)
    /// for the base model alone. Any adapter of the model can be named, active or not. Pass it
    /// to the model's `forward_with`; every site computes the base once for the whole batch
    /// and each adapter only on its rows.
    ///
    /// Unknown names are [`PeftError::AdapterNotFound`] (PEFT once ignored typos silently);
    /// merged adapters are refused, as in PEFT, since the base weights then hold them.
    ///
    /// ```
    /// # use burn::tensor::Device;
    /// # use peft_core::{Adaptable, PeftModel, nn::LinearConfig};
    /// # #[derive(burn::module::Module, Debug, Adaptable)]
    /// # struct Net { proj: peft_core::nn::Linear }
    /// let device = Device::flex();
    /// let model = PeftModel::new(Net { proj: LinearConfig::new(4, 4).init(&device) });
    /// assert!(model.adapter_rows(&["__base__", "__base__"], &device).is_ok());
    /// assert!(model.adapter_rows(&["typo"], &device).is_err());
    /// ```
    pub fn adapter_rows(
        &self,
        names: &[&str],
        device: &burn::tensor::Device,
    ) -> Result<ForwardContext> {
        for name in names.iter().filter(|n| **n != BASE_ROW) {
            self.registry.config(name)?;
        }
        if self.merged() {
            return Err(PeftError::InvalidState(
                "adapters are merged into the base weights; unmerge them before a mixed-adapter \
                 batch (PEFT refuses mixed batches with merged adapters too)"
                    .into(),
            ));
        }
        Ok(ForwardContext::mixed(RowAdapters::new(names, device)))
    }

    /// Push the registry's active/disabled state into every site and recompute which
    /// parameters train.
    pub(super) fn refresh(&mut self) {
        let model = self.model.clone().map(&mut FreezeAll);
        self.model = model;
        let active = self.registry.forward_adapters();
        let trainable_names = self.registry.training_adapters();
        let bias_modes = self.registry.bias_modes();
        let any_all = bias_modes.values().any(|m| *m == BiasMode::All);
        let mut ids = HashSet::new();
        self.for_each_site_mut(|_, slots| {
            let mut train_bias = any_all;
            for adapter in slots.adapters.iter_mut() {
                let train = trainable_names.contains(&adapter.name);
                rules::switch_adapter(adapter, active.contains(&adapter.name), train, &mut ids);
                if train {
                    train_bias |= bias_modes.get(&adapter.name) == Some(&BiasMode::LoraOnly);
                }
            }
            let mut no_copies = Vec::new();
            let copies = slots.copies.unwrap_or(&mut no_copies);
            let first_owner = active
                .iter()
                .find(|n| copies.iter().any(|c| &c.adapter == *n))
                .cloned();
            for copy in copies.iter_mut() {
                copy.active = Some(&copy.adapter) == first_owner.as_ref();
                if trainable_names.contains(&copy.adapter) {
                    train_param(&mut copy.weight, &mut ids);
                    if let Some(b) = copy.bias.as_mut() {
                        train_param(b, &mut ids);
                    }
                }
            }
            // A site computing with its `modules_to_save` copy trains the copy's bias instead.
            let uses_copy = copies.iter().any(|c| c.active);
            if train_bias
                && !uses_copy
                && let Some(Some(bias)) = slots.bias
            {
                train_param(bias, &mut ids);
            }
        });
        if self.registry.train_base {
            self.model = self.model.clone().map(&mut TrainAll { ids: &mut ids });
        }
        self.registry.trainable = ids;
    }
}
