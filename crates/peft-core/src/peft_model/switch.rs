//! Switching adapters: which are active, disabled, per-row (mixed batches), and which
//! parameters train as a result.

use std::collections::{HashMap, HashSet};

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::Tensor;

use super::PeftModel;
use crate::adaptable::Adaptable;
use crate::error::{PeftError, Result};
use crate::method::BiasMode;
use crate::nn::{BASE_ROW, ForwardContext, RowAdapters};

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
    /// Activate exactly `names` (one or several), in this order. Merged adapters are unmerged
    /// first, as in PEFT. Only active adapters train.
    pub fn set_adapters(&mut self, names: &[&str]) -> Result<()> {
        for name in names {
            self.config(name)?;
        }
        if self.has_merged() {
            log::warn!("adapters are merged; unmerging before switching adapters");
            self.unmerge()?;
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.refresh();
        Ok(())
    }

    /// Activate the single adapter `name`.
    pub fn set_adapter(&mut self, name: &str) -> Result<()> {
        self.set_adapters(&[name])
    }

    /// Run the base model alone (adapters and `modules_to_save` copies are bypassed). Merged
    /// adapters are unmerged first.
    pub fn disable_adapters(&mut self) -> Result<()> {
        if self.has_merged() {
            self.unmerge()?;
        }
        self.disabled = true;
        self.refresh();
        Ok(())
    }

    /// Undo [`disable_adapters`](Self::disable_adapters).
    pub fn enable_adapters(&mut self) {
        self.disabled = false;
        self.refresh();
    }

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
            self.config(name)?;
        }
        if self.has_merged() {
            return Err(PeftError::InvalidState(
                "adapters are merged into the base weights; unmerge them before a mixed-adapter \
                 batch (PEFT refuses mixed batches with merged adapters too)"
                    .into(),
            ));
        }
        Ok(ForwardContext::mixed(RowAdapters::new(names, device)))
    }

    /// Push the active/disabled state into every site and recompute which parameters train.
    pub(super) fn refresh(&mut self) {
        let model = self.model.clone().map(&mut FreezeAll);
        self.model = model;
        let active: Vec<String> = if self.disabled {
            Vec::new()
        } else {
            self.active.clone()
        };
        let trainable_names: Vec<String> = self
            .active
            .iter()
            .filter(|n| !self.frozen.contains(n))
            .cloned()
            .collect();
        let bias_modes: HashMap<String, BiasMode> = self
            .configs
            .iter()
            .filter(|(n, _)| self.bias_owners.contains(n) && trainable_names.contains(n))
            .map(|(n, m)| (n.clone(), m.bias()))
            .collect();
        let any_all = bias_modes.values().any(|m| *m == BiasMode::All);
        let mut ids = HashSet::new();
        self.for_each_site_mut(|_, slots| {
            let mut train_bias = any_all;
            for adapter in slots.adapters.iter_mut() {
                adapter.active = active.contains(&adapter.name);
                if trainable_names.contains(&adapter.name) {
                    for p in adapter.matrices.iter_mut() {
                        train_param(p, &mut ids);
                    }
                    for p in adapter.vectors.iter_mut() {
                        train_param(p, &mut ids);
                    }
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
        if self.train_base {
            self.model = self.model.clone().map(&mut TrainAll { ids: &mut ids });
        }
        self.trainable = ids;
    }

    /// Let adapter `name` train when active (`true`), or keep it frozen (`false`): PEFT's
    /// `is_trainable`. Added adapters train; loaded ones whose config says `inference_mode:
    /// true` start frozen ([`load_adapter`](Self::load_adapter)).
    ///
    /// ```
    /// # use burn::tensor::Device;
    /// # use peft_core::{Adaptable, PeftModel, nn::LinearConfig};
    /// # #[derive(burn::module::Module, Debug, Adaptable)]
    /// # struct Net { proj: peft_core::nn::Linear }
    /// let device = Device::flex();
    /// let mut model = PeftModel::new(Net { proj: LinearConfig::new(4, 4).init(&device) });
    /// assert!(model.set_adapter_trainable("missing", true).is_err());
    /// assert!(!model.is_adapter_trainable("missing"));
    /// ```
    pub fn set_adapter_trainable(&mut self, name: &str, trainable: bool) -> Result<()> {
        self.config(name)?;
        self.frozen.retain(|n| n != name);
        if !trainable {
            self.frozen.push(name.to_string());
        }
        self.refresh();
        Ok(())
    }

    /// Whether adapter `name` trains when active (see
    /// [`set_adapter_trainable`](Self::set_adapter_trainable)).
    pub fn is_adapter_trainable(&self, name: &str) -> bool {
        self.adapter_config(name).is_some() && !self.frozen.iter().any(|n| n == name)
    }

    /// Train every parameter of the model (full fine-tuning: the baseline PEFT methods are
    /// compared against), with or without adapters; `false` returns to training adapters only.
    ///
    /// ```
    /// # use burn::tensor::Device;
    /// # use peft_core::{Adaptable, PeftModel, nn::LinearConfig};
    /// # #[derive(burn::module::Module, Debug, Adaptable)]
    /// # struct Net { dense: peft_core::nn::Linear }
    /// let net = Net { dense: LinearConfig::new(4, 2).init(&Device::flex()) };
    /// let mut model = PeftModel::new(net);
    /// model.set_train_base(true);
    /// assert_eq!(model.trainable_report().trainable, 4 * 2 + 2);
    /// ```
    pub fn set_train_base(&mut self, train: bool) {
        self.train_base = train;
        self.refresh();
    }

    /// Whether every base parameter trains ([`set_train_base`](Self::set_train_base)).
    pub fn trains_base(&self) -> bool {
        self.train_base
    }
}
