//! [`PeftModel`]: a model with named adapters on adapter-aware layers.
//!
//! The adapter registry and the rules for switching, merging, adding, saving and loading are
//! shared with [`PeftModule`](crate::burn_modules::PeftModule) (`crate::registry`); this module
//! holds what is particular to sites of `peft_core::nn` layers. Split by job: this file holds
//! the type and the site plumbing every job shares; `inject` builds adapters and
//! `modules_to_save` copies at the sites, `switch` pushes the active set into them (and decides
//! which parameters train), `merge` folds adapters into the base weights, `io` reads and writes
//! their tensors, `report` holds the reports, `entry` PEFT's entry point `get_peft_model`.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData};

use crate::adaptable::{Adaptable, DefaultTargets, Site, SiteMut, SitePath};
use crate::adapter::{AdapterState, BaseWeights, MergeDirection};
use crate::bundle::TensorFile;
use crate::error::Result;
use crate::method::{PeftMethod, SiteKind};
use crate::nn::{KernelSlot, Linear, ModuleCopy, QuantizedBase, WeightLayout};
use crate::registry::{AdapterHost, AdapterRegistry, Purpose, adapter_api, rules};

mod entry;
mod inject;
mod io;
mod merge;
mod report;
mod switch;

pub use entry::get_peft_model;
pub(crate) use report::count_params;
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
    registry: AdapterRegistry,
}

struct SiteRecord {
    path: String,
    kind: SiteKind,
    device: burn::tensor::Device,
    base: Option<BaseWeights>,
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
        Site::Conv1d(c) => {
            let [out_channels, _, k] = c.dims();
            SiteKind::Conv1d {
                in_channels: c.in_channels(),
                out_channels,
                kernel_size: [1, k],
                geometry: c.geometry(),
                bias: c.bias.is_some(),
            }
        }
        Site::Conv2d(c) => {
            let [out_channels, _, kh, kw] = c.dims();
            SiteKind::Conv2d {
                in_channels: c.in_channels(),
                out_channels,
                kernel_size: [kh, kw],
                geometry: c.geometry,
                bias: c.bias.is_some(),
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
        Site::Conv1d(c) => (c.weight.lazy_device(), Some(c.base_matrix())),
        Site::Conv2d(c) => (c.weight.lazy_device(), Some(c.base_matrix())),
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
    /// A convolution's kernel `[out, in / groups, kh, kw]` (`weight` is then `None`; merges see
    /// it as the matrix `nn::kernel_as_matrix` gives).
    kernel: Option<KernelSlot<'a>>,
}

/// The slots of a convolution of either rank: adapters, bias and kernel; no dense matrix
/// weight, no `modules_to_save` copies, no quantized base.
fn conv_slots<'a>(
    adapters: &'a mut Vec<AdapterState>,
    bias: &'a mut Option<Param<Tensor<1>>>,
    kernel: KernelSlot<'a>,
) -> SlotsMut<'a> {
    SlotsMut {
        adapters,
        copies: None,
        weight: None,
        bias: Some(bias),
        layout: None,
        bare_keys: false,
        quantized: None,
        dims: [0, 0],
        kernel: Some(kernel),
    }
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
                kernel: None,
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
            kernel: None,
        },
        SiteMut::Conv1d(c) => {
            conv_slots(&mut c.adapters, &mut c.bias, KernelSlot::D1(&mut c.weight))
        }
        SiteMut::Conv2d(c) => {
            conv_slots(&mut c.adapters, &mut c.bias, KernelSlot::D2(&mut c.weight))
        }
        SiteMut::KvPrefix(p) => SlotsMut {
            adapters: &mut p.adapters,
            copies: None,
            weight: None,
            bias: None,
            layout: None,
            bare_keys: true,
            quantized: None,
            dims: [0, 0],
            kernel: None,
        },
    }
}

impl<M: Adaptable + Module> PeftModel<M> {
    /// Wrap `model`; it has no adapters yet and its parameters are left as they are.
    pub fn new(model: M) -> Self {
        Self {
            model,
            registry: AdapterRegistry::default(),
        }
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

    /// Remove adapter `name`, which was just added and never merged nor trained, leaving merged
    /// adapters as they are (unlike [`delete_adapter`](Self::delete_adapter)): the rollback of
    /// a failed [`add_weighted_adapter`](Self::add_weighted_adapter).
    pub(crate) fn discard_adapter(&mut self, name: &str) {
        // Removing sites' adapters and recomputing what trains cannot fail for this host.
        if let Err(e) = rules::discard_adapter(self, name) {
            log::warn!("discarding adapter `{name}`: {e}");
        }
    }
}

adapter_api!(
    PeftModel,
    [Adaptable + Module],
    "# use burn::tensor::Device;
# use peft_core::{Adaptable, PeftModel, nn::LinearConfig};
# #[derive(burn::module::Module, Debug, Adaptable)]
# struct Net { proj: peft_core::nn::Linear }
# let device = Device::flex();
# let base = Net { proj: LinearConfig::new(4, 4).init(&device) };
# let mut model = PeftModel::new(base.clone());"
);

/// The sites of adapter-aware layers hold the adapters; the shared rules drive them.
impl<M: Adaptable + Module> AdapterHost for PeftModel<M> {
    type Snapshot = M;

    fn registry(&self) -> &AdapterRegistry {
        &self.registry
    }

    fn registry_mut(&mut self) -> &mut AdapterRegistry {
        &mut self.registry
    }

    fn default_targets(&self, table: &str) -> Option<DefaultTargets> {
        self.model.default_targets(table)
    }

    fn classifier_head(&self) -> Option<String> {
        self.model.classifier_head()
    }

    fn attach(
        &mut self,
        name: &str,
        method: &dyn PeftMethod,
        _purpose: Purpose,
    ) -> Result<(InjectionReport, Option<Box<dyn PeftMethod>>)> {
        // Adapter-aware layers run every adapter's own forward: any purpose is served.
        self.inject(name, method)
    }

    fn detach(&mut self, name: &str) -> Result<()> {
        self.for_each_site_mut(|_, slots| {
            slots.adapters.retain(|a| a.name != name);
            if let Some(copies) = slots.copies {
                copies.retain(|c| c.adapter != name);
            }
        });
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.refresh();
        Ok(())
    }

    fn is_merged(&self) -> bool {
        self.merged()
    }

    fn fold(&mut self, direction: MergeDirection) -> Result<()> {
        // All or nothing: sites folded before a failure are restored.
        let snapshot = self.model.clone();
        let folded = self.fold_sites(direction);
        if folded.is_err() {
            self.model = snapshot;
        }
        folded
    }

    fn export(&self, name: &str) -> Result<BTreeMap<String, TensorData>> {
        self.export_tensors(name)
    }

    fn import(&mut self, name: &str, file: &mut TensorFile) -> Result<()> {
        self.import_tensors(name, file)
    }

    fn param_report(&self) -> TrainableReport {
        self.count_params()
    }

    fn snapshot(&self) -> M {
        self.model.clone()
    }

    fn restore(&mut self, snapshot: M) {
        self.model = snapshot;
    }
}
