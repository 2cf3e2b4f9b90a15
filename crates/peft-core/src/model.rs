//! [`PeftModel`]: a model with named adapters.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Tensor, TensorData};

use crate::adaptable::{Adaptable, Site, SiteMut, SitePath};
use crate::adapter::{AdapterState, BaseWeights, MergeDirection, MergeInput, TensorSource};
use crate::bundle::{self, KEY_PREFIX, TensorFile};
use crate::error::{PeftError, Result};
use crate::matching::{self, all_linear_names};
use crate::method::{BiasMode, PeftMethod, SiteInfo, SiteKind, peft_type_of};
use crate::nn::{BASE_ROW, ForwardContext, Linear, ModuleCopy, RowAdapters, WeightLayout};

/// PEFT's `print_trainable_parameters` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableReport {
    /// Parameters that receive gradients.
    pub trainable: usize,
    /// All parameters, base and adapters.
    pub all: usize,
}

impl TrainableReport {
    /// `100 * trainable / all`.
    pub fn percent(&self) -> f64 {
        if self.all == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.all as f64
        }
    }
}

/// `n` with a comma every three digits (`22,793,104`), as PEFT prints counts.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for TrainableReport {
    /// The exact line PEFT prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            self.percent()
        )
    }
}

/// Summary of an injection.
#[derive(Debug, Clone, Default)]
pub struct InjectionReport {
    /// Paths that received the adapter.
    pub adapted: Vec<String>,
    /// Paths that received a `modules_to_save` copy.
    pub saved_copies: Vec<String>,
}

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

struct SlotsMut<'a> {
    adapters: &'a mut Vec<AdapterState>,
    /// `modules_to_save` copies; `None` for sites that have no base weights (KV prefix).
    copies: Option<&'a mut Vec<ModuleCopy>>,
    weight: Option<&'a mut Param<Tensor<2>>>,
    bias: Option<&'a mut Option<Param<Tensor<1>>>>,
    layout: Option<WeightLayout>,
    /// Bundle keys of this site are bare names (PEFT's `prompt_embeddings`).
    bare_keys: bool,
}

fn slots(site: SiteMut<'_>) -> SlotsMut<'_> {
    match site {
        SiteMut::Linear(Linear {
            weight,
            bias,
            adapters,
            copies,
            layout,
        }) => SlotsMut {
            adapters,
            copies: Some(copies),
            weight: Some(weight),
            bias: Some(bias),
            layout: Some(*layout),
            bare_keys: false,
        },
        SiteMut::Embedding(e) => SlotsMut {
            adapters: &mut e.adapters,
            copies: Some(&mut e.copies),
            weight: Some(&mut e.weight),
            bias: None,
            layout: None,
            bare_keys: false,
        },
        SiteMut::KvPrefix(p) => SlotsMut {
            adapters: &mut p.adapters,
            copies: None,
            weight: None,
            bias: None,
            layout: None,
            bare_keys: true,
        },
    }
}

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

struct CountParams<'a> {
    trainable_ids: &'a HashSet<ParamId>,
    report: TrainableReport,
}

impl ModuleVisitor for CountParams<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.lazy_shape().num_elements();
        self.report.all += n;
        if self.trainable_ids.contains(&param.id) {
            self.report.trainable += n;
        }
    }
}

fn train_param<const D: usize>(param: &mut Param<Tensor<D>>, ids: &mut HashSet<ParamId>) {
    *param = param.clone().set_require_grad(true);
    ids.insert(param.id);
}

/// Convert a Burn-layout weight to the layout of a Hugging Face file.
fn to_file_layout(weight: Tensor<2>, layout: Option<WeightLayout>) -> TensorData {
    match layout {
        Some(WeightLayout::Linear) => weight.transpose().into_data(),
        _ => weight.into_data(),
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

    fn sites(&self) -> Vec<SiteRecord> {
        let mut out = Vec::new();
        let model_device = self.model.devices().into_iter().next();
        self.model
            .visit_sites(&mut SitePath::root(), &mut |path, site| {
                let device = match site {
                    Site::Linear(l) => l.weight.lazy_device(),
                    Site::Embedding(e) => e.weight.lazy_device(),
                    Site::KvPrefix(_) => model_device.clone().unwrap_or_default(),
                };
                let base = match site {
                    Site::Linear(l) => Some(BaseWeights {
                        weight: l.weight.val(),
                        bias: l.bias.as_ref().map(|b| b.val()),
                    }),
                    Site::Embedding(e) => Some(BaseWeights {
                        weight: e.weight.val(),
                        bias: None,
                    }),
                    Site::KvPrefix(_) => None,
                };
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

    /// Inject adapter `name` built from `method`, freeze every base parameter, and make the
    /// adapter trainable. The first adapter added becomes the active one (as in PEFT).
    pub fn add_adapter(&mut self, name: &str, method: &dyn PeftMethod) -> Result<InjectionReport> {
        if self.configs.iter().any(|(n, _)| n == name) {
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
        method.validate()?;
        let sites = self.sites();
        // Modules named by `target_modules` / `modules_to_save`: linear and embedding sites.
        let module_sites: Vec<&SiteRecord> = sites
            .iter()
            .filter(|s| !matches!(s.kind, SiteKind::KvPrefix { .. }))
            .collect();
        let paths: Vec<String> = module_sites.iter().map(|s| s.path.clone()).collect();
        let to_save = method.modules_to_save();
        // PEFT itself writes `modules_to_save` entries that match nothing (for SEQ_CLS it appends
        // both "classifier" and "score"), so these are warnings, not errors.
        for entry in &to_save {
            if !paths.iter().any(|p| p.ends_with(entry.as_str())) {
                log::warn!(
                    "modules_to_save entry `{entry}` matches no layer of the model (closest: {})",
                    matching::closest_names(entry, &paths, 3).join(", ")
                );
            }
        }
        let is_saved =
            |p: &str| paths.iter().any(|q| q == p) && matching::gets_saved_copy(&to_save, p);
        let targets: Vec<String> = if method.adapts_attention_prefix() {
            let prefix_sites: Vec<String> = sites
                .iter()
                .filter(|s| matches!(s.kind, SiteKind::KvPrefix { .. }))
                .map(|s| s.path.clone())
                .collect();
            if prefix_sites.is_empty() {
                return Err(PeftError::UnsupportedSite {
                    path: "<model>".into(),
                    kind: "model without an attention key/value prefix site".into(),
                    method: peft_type_of(method).into(),
                });
            }
            prefix_sites
        } else {
            let linear_paths: Vec<String> = module_sites
                .iter()
                .filter(|s| matches!(s.kind, SiteKind::Linear { .. }))
                .map(|s| s.path.clone())
                .collect();
            // PEFT leaves out the output embeddings, else (SEQ_CLS only) the classifier head.
            let excluded: Vec<String> = match self.model.output_layer() {
                Some(output) => vec![output],
                None if method.task_type() == Some("SEQ_CLS") => {
                    self.model.classifier_head().into_iter().collect()
                }
                None => Vec::new(),
            };
            let all_linear = all_linear_names(&linear_paths, &excluded);
            let mut shielded = HashSet::new();
            for p in &paths {
                if matching::shielded_by_modules_to_save(&to_save, p)? {
                    shielded.insert(p.clone());
                }
            }
            matching::select_targets(&method.targets(), &paths, &all_linear, &|p| {
                shielded.contains(p)
            })?
        };

        let infos: Vec<SiteInfo> = sites
            .iter()
            .filter(|s| targets.contains(&s.path))
            .map(|s| SiteInfo {
                path: s.path.clone(),
                kind: s.kind.clone(),
                device: s.device.clone(),
                base: s.base.clone(),
            })
            .collect();
        let resolved = method.resolve(&infos)?;
        let method: &dyn PeftMethod = resolved.as_deref().unwrap_or(method);
        let mut built: HashMap<String, AdapterState> = HashMap::new();
        for info in &infos {
            if !method.supports(&info.kind) {
                return Err(PeftError::UnsupportedSite {
                    path: info.path.clone(),
                    kind: info.kind.name().into(),
                    method: peft_type_of(method).into(),
                });
            }
            built.insert(info.path.clone(), method.create_adapter(name, info)?);
        }

        let mut report = InjectionReport::default();
        self.for_each_site_mut(|path, slots| {
            if let Some(state) = built.remove(path) {
                slots.adapters.push(state);
                report.adapted.push(path.to_string());
            }
            if is_saved(path)
                && let (Some(copies), Some(weight)) = (slots.copies, slots.weight)
            {
                let bias = slots.bias.as_ref().and_then(|b| b.as_ref());
                copies.push(ModuleCopy::new(name, weight, bias));
                report.saved_copies.push(path.to_string());
            }
        });
        self.configs.push((name.to_string(), method.clone_method()));
        if self.active.is_empty() {
            self.active.push(name.to_string());
            if method.bias() != BiasMode::None {
                self.bias_owners.push(name.to_string());
            }
        }
        self.refresh();
        Ok(report)
    }

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

    /// Remove adapter `name` everywhere. If it was active, the remaining active adapters stay
    /// active, or else the first remaining adapter becomes active.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.config(name)?;
        if self.has_merged() {
            self.unmerge()?;
        }
        self.for_each_site_mut(|_, slots| {
            slots.adapters.retain(|a| a.name != name);
            if let Some(copies) = slots.copies {
                copies.retain(|c| c.adapter != name);
            }
        });
        self.configs.retain(|(n, _)| n != name);
        self.bias_owners.retain(|n| n != name);
        self.active.retain(|n| n != name);
        if self.active.is_empty()
            && let Some((first, _)) = self.configs.first()
        {
            self.active.push(first.clone());
        }
        self.refresh();
        Ok(())
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

    fn has_merged(&self) -> bool {
        let mut merged = false;
        self.model
            .visit_sites(&mut SitePath::root(), &mut |_, site| {
                let adapters = match site {
                    Site::Linear(l) => &l.adapters,
                    Site::Embedding(e) => &e.adapters,
                    Site::KvPrefix(p) => &p.adapters,
                };
                merged |= adapters.iter().any(|a| a.merged);
            });
        merged
    }

    /// Fold every active adapter into the base weights (PEFT's `merge_adapter`); forward then
    /// costs what the base model costs. Fails, changing nothing, if an active adapter's method
    /// cannot merge.
    pub fn merge(&mut self) -> Result<()> {
        if self.disabled {
            return Err(PeftError::InvalidState(
                "adapters are disabled; enable them before merging".into(),
            ));
        }
        for name in &self.active {
            let method = self.config(name)?;
            if !method.mergeable() {
                return Err(PeftError::NotSupportedByMethod {
                    adapter: name.clone(),
                    method: peft_type_of(method).into(),
                    reason: "this method has no weight delta to merge".into(),
                });
            }
        }
        let snapshot = self.model.clone();
        let mut error = None;
        self.for_each_site_mut(|path, mut slots| {
            let Some(weight) = slots.weight else { return };
            for index in 0..slots.adapters.len() {
                let (earlier, rest) = slots.adapters.split_at_mut(index);
                let adapter = &mut rest[0];
                if !adapter.active || adapter.merged {
                    continue;
                }
                if error.is_some() {
                    return;
                }
                let bias = slots.bias.as_ref().and_then(|b| b.as_ref());
                // Kernels merge in f32: a half-precision frozen base (`precision`) is widened
                // here and rounded once when stored back (`set_base`).
                let base = BaseWeights {
                    weight: weight.val().detach().cast(DType::F32),
                    bias: bias.map(|b| b.val().detach()),
                };
                let kernel = adapter.kernel.clone();
                let input = MergeInput::new(base, earlier);
                match kernel.merge(adapter, input, MergeDirection::Merge) {
                    Ok(new) => {
                        set_base(weight, slots.bias.as_deref_mut(), new);
                        adapter.merged = true;
                    }
                    Err(e) => {
                        error = Some(PeftError::InvalidState(format!(
                            "merging `{}` into `{path}` failed: {e}",
                            adapter.name
                        )))
                    }
                }
            }
        });
        match error {
            Some(e) => {
                // All or nothing: sites merged before the failure are restored.
                self.model = snapshot;
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Take every merged adapter back out of the base weights.
    pub fn unmerge(&mut self) -> Result<()> {
        let mut error = None;
        self.for_each_site_mut(|path, mut slots| {
            let Some(weight) = slots.weight else { return };
            for index in (0..slots.adapters.len()).rev() {
                let (earlier, rest) = slots.adapters.split_at_mut(index);
                let adapter = &mut rest[0];
                if !adapter.merged {
                    continue;
                }
                let bias = slots.bias.as_ref().and_then(|b| b.as_ref());
                // Kernels merge in f32: a half-precision frozen base (`precision`) is widened
                // here and rounded once when stored back (`set_base`).
                let base = BaseWeights {
                    weight: weight.val().detach().cast(DType::F32),
                    bias: bias.map(|b| b.val().detach()),
                };
                let kernel = adapter.kernel.clone();
                let input = MergeInput::new(base, earlier);
                match kernel.merge(adapter, input, MergeDirection::Unmerge) {
                    Ok(new) => {
                        set_base(weight, slots.bias.as_deref_mut(), new);
                        adapter.merged = false;
                    }
                    Err(e) => {
                        error.get_or_insert(PeftError::InvalidState(format!(
                            "unmerging `{}` from `{path}` failed: {e}",
                            adapter.name
                        )));
                    }
                }
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Merge the active adapters, swap in the active `modules_to_save` copies, drop every
    /// adapter and return the plain model: no added latency.
    pub fn merge_and_unload(mut self) -> Result<M> {
        if self.disabled {
            self.enable_adapters();
        }
        self.merge()?;
        Ok(self.unload())
    }

    /// Drop every adapter without merging and return the base model (active `modules_to_save`
    /// copies replace their originals, as in PEFT).
    pub fn unload(mut self) -> M {
        self.for_each_site_mut(|_, slots| {
            if let (Some(copies), Some(weight)) = (slots.copies, slots.weight) {
                if let Some(pos) = copies.iter().position(|c| c.active) {
                    let copy = copies.swap_remove(pos);
                    *weight = copy.weight;
                    if let Some(bias) = slots.bias {
                        *bias = copy.bias;
                    }
                }
                copies.clear();
            }
            slots.adapters.clear();
        });
        self.model
    }

    /// PEFT's `print_trainable_parameters` numbers.
    pub fn trainable_report(&self) -> TrainableReport {
        let mut counter = CountParams {
            trainable_ids: &self.trainable,
            report: TrainableReport {
                trainable: 0,
                all: 0,
            },
        };
        self.model.visit(&mut counter);
        counter.report
    }

    /// Push the active/disabled state into every site and recompute which parameters train.
    fn refresh(&mut self) {
        let model = self.model.clone().map(&mut FreezeAll);
        self.model = model;
        let active: Vec<String> = if self.disabled {
            Vec::new()
        } else {
            self.active.clone()
        };
        let trainable_names: Vec<String> = self.active.clone();
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

    /// Save adapter `name` as a PEFT bundle under `dir` (`dir` itself for `default`, else
    /// `dir/<name>`), atomically: on any failure the previous bundle is left as it was.
    pub fn save_adapter(&self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        let method = self.config(name)?;
        let bundle_dir = bundle::adapter_dir(dir.as_ref(), name);
        let mut config = bundle::method_to_json(method);
        if let (Some(base), Some(map)) = (&self.base_model_name_or_path, config.as_object_mut()) {
            map.insert(
                "base_model_name_or_path".into(),
                serde_json::Value::String(base.clone()),
            );
        }
        let tensors = self.adapter_tensors(name)?;
        let weights = bundle::encode_safetensors(&tensors)?;
        let config_text = bundle::render_config(&config);
        bundle::write_files_atomically(
            &bundle_dir,
            &[
                (bundle::WEIGHTS_FILE, weights.as_slice()),
                (bundle::CONFIG_FILE, config_text.as_bytes()),
            ],
        )
    }

    /// The tensors of adapter `name` as they go into `adapter_model.safetensors`.
    pub fn adapter_tensors(&self, name: &str) -> Result<BTreeMap<String, TensorData>> {
        let method = self.config(name)?;
        let bias_mode = method.bias();
        let copy_prefix = method.module_key_prefix();
        let mut out = BTreeMap::new();
        self.model
            .visit_sites(&mut SitePath::root(), &mut |path, site| {
                let no_copies = Vec::new();
                let (adapters, copies, bias, layout) = match site {
                    Site::Linear(l) => (&l.adapters, &l.copies, l.bias.as_ref(), Some(l.layout)),
                    Site::Embedding(e) => (&e.adapters, &e.copies, None, None),
                    Site::KvPrefix(p) => {
                        // Prompt-learning tensors are saved under bare names (`prompt_embeddings`).
                        for adapter in p.adapters.iter().filter(|a| a.name == name) {
                            out.extend(adapter.kernel.export(adapter));
                        }
                        (&p.adapters, &no_copies, None, None)
                    }
                };
                if matches!(site, Site::KvPrefix(_)) {
                    return;
                }
                // PEFT names the bias of any wrapped layer `base_layer.bias`, whichever adapter
                // wrapped it.
                let adapted = !adapters.is_empty();
                for adapter in adapters.iter().filter(|a| a.name == name) {
                    for (suffix, data) in adapter.kernel.export(adapter) {
                        out.insert(format!("{KEY_PREFIX}{path}.{suffix}"), data);
                    }
                }
                for copy in copies.iter().filter(|c| c.adapter == name) {
                    out.insert(
                        format!("{copy_prefix}{path}.weight"),
                        to_file_layout(copy.weight.val(), layout),
                    );
                    if let Some(b) = &copy.bias {
                        out.insert(format!("{copy_prefix}{path}.bias"), b.val().into_data());
                    }
                }
                let save_bias = match bias_mode {
                    BiasMode::None => false,
                    BiasMode::LoraOnly => adapted,
                    BiasMode::All => true,
                };
                if save_bias && let Some(b) = bias {
                    let key = if adapted {
                        format!("{KEY_PREFIX}{path}.base_layer.bias")
                    } else {
                        format!("{KEY_PREFIX}{path}.bias")
                    };
                    out.entry(key).or_insert_with(|| b.val().into_data());
                }
            });
        Ok(out)
    }

    /// Load the PEFT bundle in `dir` (`adapter_config.json` + `adapter_model.safetensors`) as
    /// adapter `name`. Every tensor must be consumed and have the right shape; on any error the
    /// model is left as it was.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<LoadReport> {
        let dir = dir.as_ref();
        let loaded = bundle::read_config(dir)?;
        let weights_path = dir.join(bundle::WEIGHTS_FILE);
        let mut file = TensorFile::read(&weights_path)?;
        let snapshot = self.model.clone();
        let previous = (self.active.clone(), self.disabled);
        self.add_adapter(name, loaded.method.as_ref())
            .map_err(|e| e.in_file(&dir.join(bundle::CONFIG_FILE)))?;
        let result = self.import_tensors(name, &mut file).and_then(|()| {
            match file.unused_keys().into_iter().next() {
                Some(key) => Err(PeftError::UnexpectedTensor {
                    file: weights_path.clone(),
                    key,
                }),
                None => Ok(()),
            }
        });
        if let Err(e) = result {
            self.model = snapshot;
            self.configs.retain(|(n, _)| n != name);
            self.bias_owners.retain(|n| n != name);
            (self.active, self.disabled) = previous;
            self.refresh();
            return Err(e);
        }
        self.refresh();
        Ok(LoadReport {
            unknown_config_keys: loaded.unknown_keys,
        })
    }

    fn import_tensors(&mut self, name: &str, file: &mut TensorFile) -> Result<()> {
        let bias_mode = self.config(name)?.bias();
        let copy_prefix = self.config(name)?.module_key_prefix();
        let mut error = None;
        self.for_each_site_mut(|path, mut slots| {
            if error.is_some() {
                return;
            }
            let result = || -> Result<()> {
                let key_path = if slots.bare_keys { "" } else { path };
                for adapter in slots.adapters.iter_mut().filter(|a| a.name == name) {
                    let kernel = adapter.kernel.clone();
                    let state = adapter.clone();
                    *adapter = kernel.import(state, &mut file.site(key_path))?;
                }
                let (Some(weight), Some(copies)) = (slots.weight, slots.copies) else {
                    return Ok(());
                };
                let device = weight.lazy_device();
                for copy in copies.iter_mut().filter(|c| c.adapter == name) {
                    let [a, b] = copy.weight.dims();
                    let file_shape = match slots.layout {
                        Some(WeightLayout::Linear) => [b, a],
                        _ => [a, b],
                    };
                    let data = file
                        .site_with(copy_prefix, path)
                        .take("weight", &file_shape)?;
                    let t = Tensor::<2>::from_data(data, &device);
                    let t = match slots.layout {
                        Some(WeightLayout::Linear) => t.transpose(),
                        _ => t,
                    };
                    copy.weight = copy.weight.clone().map(|_| t);
                    if let Some(bias) = copy.bias.as_mut() {
                        let data = file
                            .site_with(copy_prefix, path)
                            .take("bias", &bias.dims())?;
                        let t = Tensor::<1>::from_data(data, &device);
                        *bias = bias.clone().map(|_| t);
                    }
                }
                // Trained biases (PEFT's `bias` option) are stored as `base_layer.bias` for
                // wrapped layers and `bias` for others; PEFT tolerates either being absent.
                if bias_mode != BiasMode::None
                    && let Some(Some(bias)) = slots.bias.as_deref_mut()
                {
                    let mut site = file.site(path);
                    let key = ["base_layer.bias", "bias"]
                        .into_iter()
                        .find(|k| site.contains(k) && copies.iter().all(|c| c.adapter != name));
                    if let Some(key) = key {
                        let data = site.take(key, &bias.dims())?;
                        let t = Tensor::<1>::from_data(data, &device);
                        *bias = bias.clone().map(|_| t);
                    }
                }
                // transformers models make PEFT also save a targeted embedding's full table
                // (`save_embedding_layers="auto"`); it replaces the base table.
                if slots.layout.is_none() {
                    let mut site = file.site(path);
                    if site.contains("base_layer.weight") {
                        let data = site.take("base_layer.weight", &weight.dims())?;
                        let t = Tensor::<2>::from_data(data, &device);
                        *weight = weight.clone().map(|_| t);
                    }
                }
                Ok(())
            };
            if let Err(e) = result() {
                error = Some(e);
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn set_base(
    weight: &mut Param<Tensor<2>>,
    bias: Option<&mut Option<Param<Tensor<1>>>>,
    new: BaseWeights,
) {
    let dtype = weight.val().dtype();
    *weight = weight.clone().map(|_| new.weight.detach().cast(dtype));
    if let (Some(Some(b)), Some(nb)) = (bias, new.bias) {
        *b = b.clone().map(|_| nb.detach());
    }
}

/// What [`PeftModel::load_adapter`] noticed without failing.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Config keys this version does not know (PEFT's forward-compatibility rule: a warning).
    pub unknown_config_keys: Vec<String>,
}

impl<M: Adaptable + Module> PeftModel<M> {
    /// Remove adapter `name`, which was just added and never merged nor trained, leaving merged
    /// adapters as they are (unlike [`delete_adapter`](Self::delete_adapter)): the rollback of
    /// a failed [`add_weighted_adapter`](Self::add_weighted_adapter).
    pub(crate) fn discard_adapter(&mut self, name: &str) {
        self.for_each_site_mut(|_, slots| {
            slots.adapters.retain(|a| a.name != name);
            if let Some(copies) = slots.copies {
                copies.retain(|c| c.adapter != name);
            }
        });
        self.configs.retain(|(n, _)| n != name);
        self.bias_owners.retain(|n| n != name);
        self.active.retain(|n| n != name);
        self.refresh();
    }
}
