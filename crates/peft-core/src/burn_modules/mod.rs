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
//!   [`PeftModel`](crate::PeftModel): the two share one adapter registry and one set of rules
//!   (`crate::registry`), and have the same methods with the same signatures.
//!
//! A method takes this path when its kernel gives a weight-space form
//! ([`AdapterKernel::weight_space`](crate::AdapterKernel::weight_space) and
//! [`effective_weight`](crate::AdapterKernel::effective_weight)); LoRA does (without dropout,
//! which acts on the layer input and cannot be folded into a weight: PEFT's own weight-space
//! LoRA, `ParamWrapper` in peft/tuners/lora/layer.py, refuses it too). What the path does not
//! do: `modules_to_save` (entries that name a module of the model are refused, so a `SEQ_CLS`
//! config whose model has a `classifier` or `score` head is too), trainable biases (`bias` other
//! than `none`), prefix tuning.
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
//! let mut model = PeftModule::new(mlp.clone());
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
//! let dir = tempfile::tempdir().unwrap();
//! model.save_adapter(dir.path(), "default").unwrap();
//! model.merge().unwrap();
//! let merged = model.model().forward(x.clone());
//! assert!((merged - after.clone()).abs().max().into_scalar::<f32>() < 1e-6);
//! let plain: Mlp = model.merge_and_unload().unwrap();
//! assert!((plain.forward(x.clone()) - after.clone()).abs().max().into_scalar::<f32>() < 1e-6);
//!
//! // The bundle saved before merging loads onto the base model (PEFT's `from_pretrained`).
//! let loaded = PeftModule::from_pretrained(mlp, dir.path(), false).unwrap();
//! assert!((loaded.model().forward(x) - after).abs().max().into_scalar::<f32>() < 1e-6);
//! ```

mod inject;
mod io;
mod reparam;
mod scan;
mod switch;

use std::collections::BTreeMap;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Tensor, TensorData};

pub use reparam::WeightAdapters;

use crate::adaptable::DefaultTargets;
use crate::adapter::{AdapterState, MergeDirection};
use crate::bundle::TensorFile;
use crate::error::{PeftError, Result};
use crate::method::{PeftMethod, SiteKind};
use crate::peft_model::{InjectionReport, TrainableReport, count_params};
use crate::registry::{AdapterHost, AdapterRegistry, Purpose, adapter_api};
use scan::{AdapterParams, ModuleTree};

/// One adapted layer: its module path and adapters (their parameters as last read from
/// the model).
#[derive(Debug, Clone)]
pub(crate) struct AdaptedLayer {
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
    registry: AdapterRegistry,
    layers: Vec<AdaptedLayer>,
    output_layer: Option<String>,
}

impl<M: Module> PeftModule<M> {
    /// Wrap `model`; it has no adapters yet and its parameters are left as they are.
    pub fn new(model: M) -> Self {
        Self {
            model,
            registry: AdapterRegistry::default(),
            layers: Vec::new(),
            output_layer: None,
        }
    }

    /// Name the model's output layer (`lm_head`), which `target_modules: "all-linear"` leaves
    /// out. PEFT only knows it for transformers models; for any other module its `all-linear`
    /// takes every linear layer, which is also the default here.
    pub fn with_output_layer(mut self, path: impl Into<String>) -> Self {
        self.output_layer = Some(path.into());
        self
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

    /// Drop every adapter without merging and return the model as it is (weights merged before
    /// stay merged).
    pub fn unload(self) -> M {
        reparam::strip(self.model)
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

    /// Put `self.layers` (with the registry's active set and the merged flags as they are
    /// now) into the model: take every adapter off, write `values` (new base weights and biases
    /// by parameter path) and attach the adapters again; every base parameter is frozen (or
    /// trains, with `set_train_base`) and the training adapters' tensors train.
    fn rebuild(&mut self, mut attach: reparam::Attach) {
        let forward = self.registry.forward_adapters();
        let training = self.registry.training_adapters();
        let train_base = self.registry.train_base;
        let mut trainable = std::collections::HashSet::new();
        for layer in &mut self.layers {
            for adapter in &mut layer.adapters {
                // Full fine-tuning trains every parameter, adapters included, as in `PeftModel`.
                let train = train_base || training.contains(&adapter.name);
                let forward = forward.contains(&adapter.name);
                crate::registry::rules::switch_adapter(adapter, forward, train, &mut trainable);
            }
            attach
                .adapters
                .insert(layer.weight_path(), layer.adapters.clone());
        }
        attach.train_base = train_base;
        let plain = reparam::strip(self.model.clone());
        self.model = plain.apply_reparameterization(attach);
        if train_base {
            trainable.extend(scan::param_ids(&self.model));
        }
        self.registry.trainable = trainable;
    }
}

adapter_api!(
    PeftModule,
    [Module],
    "# use burn::tensor::Device;
# use peft_core::burn_modules::PeftModule;
# let device = Device::flex();
# let base = burn::nn::LinearConfig::new(4, 4).init(&device);
# let mut model = PeftModule::new(base.clone());"
);

/// Burn's parameter reparameterizations hold the adapters; the shared rules drive them.
impl<M: Module> AdapterHost for PeftModule<M> {
    type Snapshot = (M, Vec<AdaptedLayer>);

    fn registry(&self) -> &AdapterRegistry {
        &self.registry
    }

    fn registry_mut(&mut self) -> &mut AdapterRegistry {
        &mut self.registry
    }

    fn default_targets(&self, _table: &str) -> Option<DefaultTargets> {
        // PEFT's defaults are keyed by transformers' `model_type`, which a plain module lacks.
        None
    }

    fn classifier_head(&self) -> Option<String> {
        None
    }

    fn attach(
        &mut self,
        name: &str,
        method: &dyn PeftMethod,
        purpose: Purpose,
    ) -> Result<(InjectionReport, Option<Box<dyn PeftMethod>>)> {
        self.inject(name, method, purpose)
    }

    fn detach(&mut self, name: &str) -> Result<()> {
        let mut layers = self.read_layers()?;
        for layer in &mut layers {
            layer.adapters.retain(|a| a.name != name);
        }
        layers.retain(|l| !l.adapters.is_empty());
        self.layers = layers;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.layers = self.read_layers()?;
        self.rebuild(reparam::Attach::default());
        Ok(())
    }

    fn is_merged(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.adapters.iter().any(|a| a.merged))
    }

    fn fold(&mut self, direction: MergeDirection) -> Result<()> {
        self.fold_layers(direction)
    }

    fn export(&self, name: &str) -> Result<BTreeMap<String, TensorData>> {
        self.export_tensors(name)
    }

    fn import(&mut self, name: &str, file: &mut TensorFile) -> Result<()> {
        self.import_tensors(name, file)
    }

    fn param_report(&self) -> TrainableReport {
        count_params(&self.model, &self.registry.trainable)
    }

    fn snapshot(&self) -> Self::Snapshot {
        (self.model.clone(), self.layers.clone())
    }

    fn restore(&mut self, (model, layers): Self::Snapshot) {
        self.model = model;
        self.layers = layers;
    }
}
