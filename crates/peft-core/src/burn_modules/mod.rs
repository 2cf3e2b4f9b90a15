//! Adapters for any Burn model, unedited: [`PeftModule`] adapts the `burn::nn::Linear` and
//! `burn::nn::Embedding` layers of a plain Burn module in weight space.
//!
//! [`PeftModel`](crate::PeftModel) needs a model built from burn-peft's adapter-aware layers.
//! A model written with Burn's own layers (yours, or one from tracel-ai's model crates) has no
//! such site, but each of its weights is a `Param` and Burn lets a parameter carry a
//! *reparameterization* (the machinery behind Burn's `Module::apply_lora`): the layer keeps
//! calling `self.weight.val()` and gets `W' = effective_weight(W)` of the active adapters, for
//! LoRA `W + A·B·s`. So:
//!
//! - targets are found by Burn's own module paths (the names `ModuleVisitor::enter_module`
//!   gives: field names, `Vec` indices) under PEFT's matching rules, exactly as for
//!   [`PeftModel`](crate::PeftModel) (`target_modules` list / regex / `"all-linear"`,
//!   `exclude_modules`, `layers_to_transform`); a target that matches nothing, or a module of
//!   another kind (a `LayerNorm`, an attention block), is a typed error;
//! - the adapters' tensors are ordinary trainable parameters of the model, every base parameter
//!   is frozen, and training is the usual Burn loop with
//!   [`update`](PeftModule::update) around the optimizer step;
//! - merging, unmerging, named adapters and PEFT bundles (`adapter_config.json` +
//!   `adapter_model.safetensors`, the keys PEFT writes for the same module paths) work as in
//!   [`PeftModel`](crate::PeftModel).
//!
//! A method takes this path when its kernel gives a weight-space form
//! ([`AdapterKernel::weight_space`](crate::AdapterKernel::weight_space) and
//! [`effective_weight`](crate::AdapterKernel::effective_weight)); LoRA does (without dropout,
//! which acts on the layer input and cannot be folded into a weight: PEFT's own weight-space
//! LoRA, `ParamWrapper` in peft/tuners/lora/layer.py, refuses it too). What the path does not
//! do: `modules_to_save`, trainable biases (`bias` other than `none`), prefix tuning.
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig};
//! use burn::tensor::{Device, Distribution, Tensor};
//! use peft_core::burn_modules::PeftModule;
//! # use std::sync::Arc;
//! # use burn::tensor::TensorData;
//! # use peft_core::{AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, PeftMethod,
//! #     Result, SiteInfo, SiteKind, TargetModules, TargetSpec, TensorSource, WeightSpace};
//! # /// A learned scale per output feature, `W' = W · diag(l)` (a doc stand-in for LoRA, which
//! # /// lives in peft-lora).
//! # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! # struct Scale { target_modules: Option<TargetModules> }
//! # #[typetag::serde(name = "SCALE_COLUMNS_DOC")]
//! # impl PeftMethod for Scale {
//! #     fn targets(&self) -> TargetSpec { TargetSpec { target_modules: self.target_modules.clone(), ..Default::default() } }
//! #     fn supports(&self, kind: &SiteKind) -> bool { matches!(kind, SiteKind::Linear { .. }) }
//! #     fn create_adapter(&self, name: &str, site: &SiteInfo) -> Result<AdapterState> {
//! #         let SiteKind::Linear { d_output, .. } = site.kind else { unreachable!() };
//! #         let l = Tensor::<1>::full([d_output], 2.0, &site.device);
//! #         Ok(AdapterState::new(name, vec![], vec![l], Arc::new(ScaleKernel)))
//! #     }
//! #     fn clone_method(&self) -> Box<dyn PeftMethod> { Box::new(self.clone()) }
//! # }
//! # #[derive(Debug)]
//! # struct ScaleKernel;
//! # impl AdapterKernel for ScaleKernel {
//! #     fn weight_space(&self) -> WeightSpace { WeightSpace::Exact }
//! #     fn effective_weight(&self, state: &AdapterState, _base: &Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
//! #         weight * state.vectors[0].val().unsqueeze::<2>()
//! #     }
//! #     fn merge(&self, state: &mut AdapterState, site: MergeInput<'_>, direction: MergeDirection) -> Result<BaseWeights> {
//! #         let l = state.vectors[0].val();
//! #         let (w, b) = (site.current.weight, site.current.bias);
//! #         Ok(match direction {
//! #             MergeDirection::Merge => BaseWeights { weight: w * l.clone().unsqueeze::<2>(), bias: b.map(|b| b * l) },
//! #             MergeDirection::Unmerge => BaseWeights { weight: w / l.clone().unsqueeze::<2>(), bias: b.map(|b| b / l) },
//! #         })
//! #     }
//! #     fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> { vec![("scale".into(), state.vectors[0].val().into_data())] }
//! #     fn import(&self, mut state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState> {
//! #         let data = source.take("scale", &state.vectors[0].dims())?;
//! #         state.set_vector(0, data);
//! #         Ok(state)
//! #     }
//! # }
//!
//! // A model written with Burn's own layers, unchanged.
//! #[derive(Module, Debug)]
//! struct Mlp {
//!     up_proj: Linear,
//!     down_proj: Linear,
//! }
//!
//! impl Mlp {
//!     fn forward(&self, x: Tensor<2>) -> Tensor<2> {
//!         self.down_proj.forward(self.up_proj.forward(x))
//!     }
//! }
//!
//! let device = Device::flex();
//! let mlp = Mlp {
//!     up_proj: LinearConfig::new(4, 8).with_bias(false).init(&device),
//!     down_proj: LinearConfig::new(8, 2).with_bias(false).init(&device),
//! };
//! let x = Tensor::<2>::random([3, 4], Distribution::Default, &device);
//! let before = mlp.forward(x.clone());
//!
//! let mut model = PeftModule::new(mlp);
//! // With peft-lora linked: `&LoraConfig { target_modules: Some(["down_proj"].into()), .. }`.
//! # let method = Scale { target_modules: Some(["down_proj"].into()) };
//! let report = model.add_adapter("default", &method).unwrap();
//! assert_eq!(report.adapted, ["down_proj"]);
//! // The model's own forward now runs through the adapter (this one doubles the outputs).
//! let after = model.model().forward(x.clone());
//! assert!((after.clone() - before.clone() * 2.0).abs().max().into_scalar::<f32>() < 1e-6);
//!
//! // Only the adapter trains; merging folds it into the weights.
//! assert_eq!(model.trainable_report().trainable, 2);
//! model.merge().unwrap();
//! let merged = model.model().forward(x.clone());
//! assert!((merged - after.clone()).abs().max().into_scalar::<f32>() < 1e-6);
//! let plain: Mlp = model.merge_and_unload().unwrap();
//! assert!((plain.forward(x) - after).abs().max().into_scalar::<f32>() < 1e-6);
//! ```

mod inject;
mod io;
mod reparam;
mod scan;
mod switch;

use std::collections::HashSet;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

pub use reparam::WeightAdapters;

use crate::adapter::AdapterState;
use crate::error::{PeftError, Result};
use crate::method::{PeftMethod, SiteKind};
use crate::peft_model::TrainableReport;
use scan::{AdapterParams, ModuleTree};

/// One adapted layer: its module path and adapters (their parameters as last read from
/// the model).
#[derive(Debug, Clone)]
struct AdaptedLayer {
    path: String,
    adapters: Vec<AdapterState>,
}

impl AdaptedLayer {
    fn weight_path(&self) -> String {
        format!("{}.weight", self.path)
    }

    fn bias_path(&self) -> String {
        format!("{}.bias", self.path)
    }
}

/// A plain Burn module with named adapters, attached in weight space (see the
/// [module docs](self)); the counterpart of [`PeftModel`](crate::PeftModel) for models that are
/// not built from burn-peft's layers.
#[derive(Debug)]
pub struct PeftModule<M> {
    model: M,
    configs: Vec<(String, Box<dyn PeftMethod>)>,
    active: Vec<String>,
    disabled: bool,
    layers: Vec<AdaptedLayer>,
    trainable: HashSet<ParamId>,
    output_layer: Option<String>,
    base_model_name_or_path: Option<String>,
}

impl<M: Module> PeftModule<M> {
    /// Wrap `model`; it has no adapters yet and its parameters are left as they are.
    pub fn new(model: M) -> Self {
        Self {
            model,
            configs: Vec::new(),
            active: Vec::new(),
            disabled: false,
            layers: Vec::new(),
            trainable: HashSet::new(),
            output_layer: None,
            base_model_name_or_path: None,
        }
    }

    /// Name the model's output layer (`lm_head`), which `target_modules: "all-linear"` leaves
    /// out. PEFT only knows it for transformers models; for any other module its `all-linear`
    /// takes every linear layer, which is also the default here.
    pub fn with_output_layer(mut self, path: impl Into<String>) -> Self {
        self.output_layer = Some(path.into());
        self
    }

    /// Record the base model's hub id or folder; written as `base_model_name_or_path`.
    pub fn with_base_model_name(mut self, name: impl Into<String>) -> Self {
        self.base_model_name_or_path = Some(name.into());
        self
    }

    /// The wrapped model; its own forward runs the active adapters.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Replace the wrapped model by `f(model)`, e.g. an optimizer step:
    /// `peft.update(|m| optim.step(lr, m, grads))`. Parameter ids must be kept, which Burn's
    /// optimizers and mappers do.
    pub fn update(&mut self, f: impl FnOnce(M) -> M) {
        let model = self.model.clone();
        self.model = f(model);
    }

    /// The names of every adapter, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// Whether adapters are disabled (the base model runs alone).
    pub fn adapters_disabled(&self) -> bool {
        self.disabled
    }

    /// The config of adapter `name`.
    pub fn adapter_config(&self, name: &str) -> Option<&dyn PeftMethod> {
        self.configs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.as_ref())
    }

    /// The layers this path can adapt, with their module paths: every `Linear` and `Embedding`
    /// of the model, in traversal order.
    pub fn adaptable_layers(&self) -> Vec<(String, SiteKind)> {
        ModuleTree::of(&self.model)
            .modules
            .iter()
            .filter(|m| !m.path.is_empty())
            .filter_map(|m| m.site_kind().map(|k| (m.path.clone(), k)))
            .collect()
    }

    /// The paths of the layers that carry adapter `name`.
    pub fn adapted_layers(&self, name: &str) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| l.adapters.iter().any(|a| a.name == name))
            .map(|l| l.path.clone())
            .collect()
    }

    /// Ids of the parameters that train (the active adapters' tensors).
    pub fn trainable_param_ids(&self) -> &HashSet<ParamId> {
        &self.trainable
    }

    /// PEFT's `print_trainable_parameters` numbers: every float parameter of the model (base
    /// and adapters) and those that train.
    pub fn trainable_report(&self) -> TrainableReport {
        struct Count<'a> {
            trainable: &'a HashSet<ParamId>,
            report: TrainableReport,
        }
        impl ModuleVisitor for Count<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let n = param.lazy_shape().num_elements();
                self.report.all += n;
                if self.trainable.contains(&param.id) {
                    self.report.trainable += n;
                }
            }
        }
        let mut count = Count {
            trainable: &self.trainable,
            report: TrainableReport {
                trainable: 0,
                all: 0,
            },
        };
        self.model.visit(&mut count);
        count.report
    }

    fn config(&self, name: &str) -> Result<&dyn PeftMethod> {
        self.adapter_config(name)
            .ok_or_else(|| PeftError::AdapterNotFound {
                name: name.to_string(),
                available: self.adapter_names(),
            })
    }

    /// The adapted layers with their adapters' parameters read from the model now (training
    /// replaces parameter values, keeping their ids).
    fn read_layers(&self) -> Result<Vec<AdaptedLayer>> {
        let mut found = AdapterParams::of(&self.model);
        let mut layers = self.layers.clone();
        for layer in &mut layers {
            for adapter in &mut layer.adapters {
                let missing = |id: ParamId| {
                    PeftError::InvalidState(format!(
                        "parameter {id} of adapter `{}` at `{}` is not in the model any more; change the model only through PeftModule::update, keeping parameter ids",
                        adapter.name, layer.path
                    ))
                };
                for param in adapter.matrices.iter_mut() {
                    let now = found
                        .remove(&param.id)
                        .and_then(|p| p.downcast::<Param<Tensor<2>>>().ok())
                        .ok_or_else(|| missing(param.id))?;
                    *param = *now;
                }
                for param in adapter.vectors.iter_mut() {
                    let now = found
                        .remove(&param.id)
                        .and_then(|p| p.downcast::<Param<Tensor<1>>>().ok())
                        .ok_or_else(|| missing(param.id))?;
                    *param = *now;
                }
            }
        }
        Ok(layers)
    }

    /// Put `self.layers` (with the active set and merged flags as they are now) into the model:
    /// take every adapter off, write `values` (new base weights and biases by parameter path)
    /// and attach the adapters again; every base parameter is frozen and the active adapters'
    /// tensors train.
    fn rebuild(&mut self, values: reparam::Attach) {
        let forward: Vec<String> = if self.disabled {
            Vec::new()
        } else {
            self.active.clone()
        };
        let mut attach = values;
        let mut trainable = HashSet::new();
        for layer in &mut self.layers {
            for adapter in &mut layer.adapters {
                adapter.active = forward.contains(&adapter.name);
                // As in `PeftModel`: the active adapters train (also while disabled).
                let train = self.active.contains(&adapter.name);
                for p in adapter.matrices.iter_mut() {
                    *p = p.clone().set_require_grad(train);
                    if train {
                        trainable.insert(p.id);
                    }
                }
                for p in adapter.vectors.iter_mut() {
                    *p = p.clone().set_require_grad(train);
                    if train {
                        trainable.insert(p.id);
                    }
                }
            }
            attach
                .adapters
                .insert(layer.weight_path(), layer.adapters.clone());
        }
        let plain = reparam::strip(self.model.clone());
        self.model = plain.apply_reparameterization(attach);
        self.trainable = trainable;
    }
}
