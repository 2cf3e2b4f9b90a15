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

/// Marks every float parameter trainable and records its id (BatchNorm's running statistics,
/// buffers Burn maps as parameters, stay out).
struct TrainAll<'a> {
    ids: &'a mut HashSet<ParamId>,
    field: Vec<String>,
}

impl ModuleMapper for TrainAll<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.field.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.field.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if super::report::in_running_stat(&self.field) {
            return param;
        }
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
        if !self.registry.train_modules.is_empty() {
            let modules = self.registry.train_modules.clone();
            self.for_each_site_mut(|path, slots| {
                if !modules.iter().any(|m| within(path, m)) {
                    return;
                }
                if let Some(weight) = slots.weight {
                    train_param(weight, &mut ids);
                }
                if let Some(mut kernel) = slots.kernel {
                    kernel.train(&mut ids);
                }
                if let Some(Some(bias)) = slots.bias {
                    train_param(bias, &mut ids);
                }
            });
        }
        if self.registry.train_base {
            self.model = self.model.clone().map(&mut TrainAll {
                ids: &mut ids,
                field: Vec::new(),
            });
        }
        self.registry.trainable = ids;
    }

    /// Train the base weights and biases of these modules in full, besides any adapters: a
    /// linear probe (`set_train_modules(&["classifier"])` trains the head alone, the baseline
    /// of transfer learning). Each entry is the module path of an adapter-aware layer
    /// (linear, embedding, convolution) or a prefix of such paths; an entry that matches none
    /// is [`PeftError::TargetNotFound`] and nothing changes. An empty list trains none again.
    /// A model training base weights is saved whole, as with
    /// [`set_train_base`](Self::set_train_base).
    ///
    /// ```
    /// # use burn::tensor::Device;
    /// # use peft_core::{Adaptable, PeftModel, nn::{Linear, LinearConfig}};
    /// #[derive(burn::module::Module, Debug, Adaptable)]
    /// struct Net { body: Linear, head: Linear }
    /// let device = Device::flex();
    /// let net = Net { body: LinearConfig::new(8, 8).init(&device), head: LinearConfig::new(8, 2).init(&device) };
    /// let mut model = PeftModel::new(net);
    /// model.set_train_modules(&["head"]).unwrap();
    /// assert_eq!(model.trainable_report().trainable, 8 * 2 + 2);
    /// assert!(model.set_train_modules(&["tail"]).is_err());
    /// ```
    pub fn set_train_modules(&mut self, modules: &[&str]) -> Result<()> {
        let mut paths = Vec::new();
        self.model
            .visit_sites(&mut crate::SitePath::root(), &mut |path, site| {
                if !matches!(site, crate::Site::KvPrefix(_)) {
                    paths.push(path.to_string());
                }
            });
        if let Some(missing) = modules.iter().find(|m| !paths.iter().any(|p| within(p, m))) {
            return Err(PeftError::TargetNotFound {
                field: "train_modules".into(),
                entry: missing.to_string(),
                kind: "adaptable layer (a module path or a prefix of some)".into(),
                closest: crate::matching::closest_names(missing, &paths, 3),
                names: paths.iter().take(8).cloned().collect(),
            });
        }
        self.registry.train_modules = modules.iter().map(|m| m.to_string()).collect();
        self.refresh();
        Ok(())
    }
}

/// Whether module path `path` is `module` or inside it.
fn within(path: &str, module: &str) -> bool {
    path == module
        || path
            .strip_prefix(module)
            .is_some_and(|rest| rest.starts_with('.'))
}
