//! [`PeftModel`]: a model with named adapters.
//!
//! Split by job: this file holds the type, its accessors and the site plumbing every job
//! shares; `inject` adds and removes adapters, `switch` activates them (and decides which
//! parameters train), `merge` folds them into the base weights, `io` saves and loads PEFT
//! bundles, `report` holds the reports the other jobs return.

use std::collections::HashSet;

use burn::module::{Module, Param, ParamId};
use burn::tensor::Tensor;

use crate::adaptable::{Adaptable, Site, SiteMut, SitePath};
use crate::adapter::{AdapterState, BaseWeights};
use crate::error::{PeftError, Result};
use crate::method::{PeftMethod, SiteKind};
use crate::nn::{Linear, ModuleCopy, QuantizedBase, WeightLayout};

mod inject;
mod io;
mod merge;
mod report;
mod switch;

pub use report::{InjectionReport, LoadReport, TrainableReport, thousands};

/// A model with named adapters: inject, switch, merge, save and load them as PEFT does.
///
/// ```
/// # use burn::tensor::Device;
/// # use peft_core::{Adaptable, PeftModel, nn::LinearConfig};
/// # #[derive(burn::module::Module, Debug, Adaptable)]
/// # struct Net { proj: peft_core::nn::Linear }
/// let device = Device::flex();
/// let model = PeftModel::new(Net { proj: LinearConfig::new(4, 4).init(&device) });
/// assert!(model.adapter_names().is_empty());
/// ```
#[derive(Debug)]
pub struct PeftModel<M> {
    model: M,
    configs: Vec<(String, Box<dyn PeftMethod>)>,
    /// Adapters whose `bias` setting made base biases trainable: as in PEFT, only an adapter that
    /// is active when it is added marks biases trainable.
    bias_owners: Vec<String>,
    active: Vec<String>,
    /// Adapters loaded for inference (PEFT's `inference_mode`): active, but never trained.
    frozen: Vec<String>,
    disabled: bool,
    trainable: HashSet<ParamId>,
    train_base: bool,
    base_model_name_or_path: Option<String>,
}

struct SiteRecord {
    path: String,
    kind: SiteKind,
    device: burn::tensor::Device,
    base: Option<BaseWeights>,
}

/// A name `add_adapter` can take: not in use, non-empty, and without '/', '\\' or '.' (it
/// becomes a key segment and a folder name in PEFT's format).
pub(crate) fn check_new_adapter_name(
    configs: &[(String, Box<dyn PeftMethod>)],
    name: &str,
) -> Result<()> {
    if configs.iter().any(|(n, _)| n == name) {
        return Err(PeftError::AdapterExists(name.to_string()));
    }
    if name.is_empty() || name.contains(['/', '\\', '.']) {
        return Err(PeftError::invalid_config(
            "adapter_name",
            format!(
                "`{name}` cannot name an adapter: it must be non-empty and hold no '/', '\\' or '.'"
            ),
        ));
    }
    Ok(())
}

pub(crate) fn site_kind(site: &Site<'_>) -> SiteKind {
    match site {
        Site::Linear(l) => {
            let [d_input, d_output] = l.dims();
            SiteKind::Linear {
                d_input,
                d_output,
                bias: l.bias.is_some(),
                layout: l.layout,
            }
        }
        Site::Embedding(e) => {
            let [n_embedding, d_model] = e.dims();
            SiteKind::Embedding {
                n_embedding,
                d_model,
            }
        }
        Site::KvPrefix(p) => SiteKind::KvPrefix {
            num_layers: p.num_layers,
            query_heads: p.query_heads,
            kv_heads: p.kv_heads,
            head_dim: p.head_dim,
            hidden_size: p.hidden_size,
        },
    }
}

/// Where a site's weights live (a KV prefix has none: `fallback`, the model's device) and its
/// base weights (none for a KV prefix), as a method's [`SiteInfo`](crate::SiteInfo) gives them.
/// A quantized base is dequantized only when `dequantize` (the method reads base weights, see
/// [`PeftMethod::reads_base_weights`](crate::PeftMethod::reads_base_weights)); otherwise its
/// empty stand-in is handed on.
pub(crate) fn site_device_and_base(
    site: &Site<'_>,
    fallback: burn::tensor::Device,
    dequantize: bool,
) -> (burn::tensor::Device, Option<BaseWeights>) {
    match site {
        Site::Linear(l) => (
            l.weight.lazy_device(),
            Some(BaseWeights {
                weight: l.base_weight(dequantize),
                bias: l.bias.as_ref().map(|b| b.val()),
            }),
        ),
        Site::Embedding(e) => (
            e.weight.lazy_device(),
            Some(BaseWeights {
                weight: e.base_table(dequantize),
                bias: None,
            }),
        ),
        Site::KvPrefix(_) => (fallback, None),
    }
}

struct SlotsMut<'a> {
    adapters: &'a mut Vec<AdapterState>,
    /// `modules_to_save` copies; `None` for sites that have no base weights (KV prefix).
    copies: Option<&'a mut Vec<ModuleCopy>>,
    weight: Option<&'a mut Param<Tensor<2>>>,
    bias: Option<&'a mut Option<Param<Tensor<1>>>>,
    layout: Option<WeightLayout>,
    /// Bundle keys of this site are bare names (PEFT's `prompt_embeddings`).
    bare_keys: bool,
    /// A quantized frozen base, when the site has one (`weight` is then an empty stand-in).
    quantized: Option<&'a mut Option<QuantizedBase>>,
    /// The base weight's logical dims (`[in, out]`, `[vocab, dim]`), quantized or not.
    dims: [usize; 2],
}

fn slots(site: SiteMut<'_>) -> SlotsMut<'_> {
    match site {
        SiteMut::Linear(l) => {
            let dims = l.dims();
            let Linear {
                weight,
                bias,
                adapters,
                copies,
                layout,
                quantized,
            } = l;
            SlotsMut {
                adapters,
                copies: Some(copies),
                weight: Some(weight),
                bias: Some(bias),
                layout: Some(*layout),
                bare_keys: false,
                quantized: Some(quantized),
                dims,
            }
        }
        SiteMut::Embedding(e) => SlotsMut {
            dims: e.dims(),
            adapters: &mut e.adapters,
            copies: Some(&mut e.copies),
            weight: Some(&mut e.weight),
            bias: None,
            layout: None,
            bare_keys: false,
            quantized: Some(&mut e.quantized),
        },
        SiteMut::KvPrefix(p) => SlotsMut {
            adapters: &mut p.adapters,
            copies: None,
            weight: None,
            bias: None,
            layout: None,
            bare_keys: true,
            quantized: None,
            dims: [0, 0],
        },
    }
}

impl<M: Adaptable + Module> PeftModel<M> {
    /// Wrap `model`; it has no adapters yet and its parameters are left as they are.
    pub fn new(model: M) -> Self {
        Self {
            model,
            configs: Vec::new(),
            bias_owners: Vec::new(),
            active: Vec::new(),
            frozen: Vec::new(),
            disabled: false,
            trainable: HashSet::new(),
            train_base: false,
            base_model_name_or_path: None,
        }
    }

    /// Record the base model's hub id or folder; written as `base_model_name_or_path`.
    pub fn with_base_model_name(mut self, name: impl Into<String>) -> Self {
        self.base_model_name_or_path = Some(name.into());
        self
    }

    /// The wrapped model (forward it as usual: active adapters take part).
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

    /// Ids of the parameters that train (adapters of active adapters, `modules_to_save` copies,
    /// biases per `bias`); the optimizer sees gradients for these only.
    pub fn trainable_param_ids(&self) -> &HashSet<ParamId> {
        &self.trainable
    }

    fn config(&self, name: &str) -> Result<&dyn PeftMethod> {
        self.adapter_config(name)
            .ok_or_else(|| PeftError::AdapterNotFound {
                name: name.to_string(),
                available: self.adapter_names(),
            })
    }

    /// Every site; `with_base` dequantizes quantized bases for methods that read base weights.
    fn sites(&self, with_base: bool) -> Vec<SiteRecord> {
        let mut out = Vec::new();
        let model_device = self.model.devices().into_iter().next();
        self.model
            .visit_sites(&mut SitePath::root(), &mut |path, site| {
                let (device, base) = site_device_and_base(
                    &site,
                    model_device.clone().unwrap_or_default(),
                    with_base,
                );
                out.push(SiteRecord {
                    path: path.to_string(),
                    kind: site_kind(&site),
                    device,
                    base,
                });
            });
        out
    }

    fn for_each_site_mut(&mut self, mut f: impl FnMut(&str, SlotsMut<'_>)) {
        self.model
            .visit_sites_mut(&mut SitePath::root(), &mut |path, site| {
                f(&path.to_string(), slots(site))
            });
    }
}
