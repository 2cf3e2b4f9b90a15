//! Weighted combination of adapters (PEFT's `add_weighted_adapter`): a new adapter built from
//! several existing ones.
//!
//! Core is method-agnostic: [`PeftModel::add_weighted_adapter`] checks the names and weights,
//! finds where each input adapter is attached, and hands the math to the first adapter's method
//! through [`PeftMethod::combine`](crate::PeftMethod::combine). That hook returns the new
//! adapter's config (injected like any other adapter) and a [`SiteCombiner`] that computes the
//! new adapter's tensors site by site from the inputs' tensors.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::Module;
use burn::tensor::TensorData;

use crate::adaptable::{Adaptable, Site, SiteMut, SitePath};
use crate::adapter::AdapterState;
use crate::error::{PeftError, Result};
use crate::method::{PeftMethod, SiteInfo};
use crate::peft_model::{InjectionReport, PeftModel, site_device_and_base, site_kind};

mod options;

pub use options::{CombinationType, CombineOptions, MajoritySignMethod, SVD_DRIVERS};

/// One adapter going into a combination, as the method hook sees it.
#[derive(Debug, Clone, Copy)]
pub struct CombineInput<'a> {
    /// The adapter's name.
    pub name: &'a str,
    /// Its weight (may be negative: subtracting an adapter is allowed, as in PEFT).
    pub weight: f64,
    /// Its config.
    pub method: &'a dyn PeftMethod,
    /// The paths of the sites it is attached to, in model order.
    pub sites: &'a [String],
}

/// The state of one input adapter at one site.
#[derive(Debug, Clone, Copy)]
pub struct SiteInput<'a> {
    /// Position of the adapter in the list given to
    /// [`PeftModel::add_weighted_adapter`] (its weight and config are at that index of the
    /// [`CombineInput`] list).
    pub index: usize,
    /// Its tensors at this site.
    pub state: &'a AdapterState,
}

/// The tensors of the new adapter at one site, in the layout of its [`AdapterState`] (same
/// order and shapes as the freshly created state); as `f32`-convertible data.
#[derive(Debug, Clone)]
pub struct CombinedTensors {
    /// Replaces [`AdapterState::matrices`] one for one.
    pub matrices: Vec<TensorData>,
    /// Replaces [`AdapterState::vectors`] one for one.
    pub vectors: Vec<TensorData>,
}

/// The per-site math of a combination, made by [`PeftMethod::combine`].
pub trait SiteCombiner: Send + Sync {
    /// The new adapter's tensors at `site`, from the inputs attached there (in input order; an
    /// input absent from the site is absent from `inputs`). `target` is the new adapter's freshly
    /// created state at the site (its shapes are the ones to return).
    fn combine_site(
        &self,
        site: &SiteInfo,
        inputs: &[SiteInput<'_>],
        target: &AdapterState,
    ) -> Result<CombinedTensors>;
}

/// What [`PeftMethod::combine`] returns: the new adapter's config and its per-site math.
pub struct Combination {
    /// The config of the new adapter: injected like [`PeftModel::add_adapter`] does (the same
    /// targets, `modules_to_save` copies of the base modules) and saved with it.
    pub config: Box<dyn PeftMethod>,
    /// Computes the new adapter's tensors at each site it was injected into.
    pub combiner: Box<dyn SiteCombiner>,
}

impl fmt::Debug for Combination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Combination")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What [`PeftModel::add_weighted_adapter`] learns about its inputs before planning.
struct InputSites {
    /// Per input, the paths of the sites it is attached to.
    attached: Vec<Vec<String>>,
    /// Sites where more than one input owns a `modules_to_save` copy, with those inputs.
    conflicts: Vec<(String, Vec<String>)>,
}

fn adapters_of<'a>(site: &Site<'a>) -> &'a [AdapterState] {
    match *site {
        Site::Linear(l) => &l.adapters,
        Site::Embedding(e) => &e.adapters,
        Site::Conv1d(c) => &c.adapters,
        Site::Conv2d(c) => &c.adapters,
        Site::KvPrefix(p) => &p.adapters,
    }
}

fn adapters_of_mut<'a>(site: SiteMut<'a>) -> &'a mut Vec<AdapterState> {
    match site {
        SiteMut::Linear(l) => &mut l.adapters,
        SiteMut::Embedding(e) => &mut e.adapters,
        SiteMut::Conv1d(c) => &mut c.adapters,
        SiteMut::Conv2d(c) => &mut c.adapters,
        SiteMut::KvPrefix(p) => &mut p.adapters,
    }
}

fn copy_owners<'a>(site: &Site<'a>) -> Vec<&'a str> {
    match *site {
        Site::Linear(l) => l.copies.iter().map(|c| c.adapter.as_str()).collect(),
        Site::Embedding(e) => e.copies.iter().map(|c| c.adapter.as_str()).collect(),
        Site::Conv1d(_) | Site::Conv2d(_) | Site::KvPrefix(_) => Vec::new(),
    }
}

fn check_shapes(path: &str, tensors: &CombinedTensors, target: &AdapterState) -> Result<()> {
    let want: Vec<Vec<usize>> = target
        .matrices
        .iter()
        .map(|m| m.dims().to_vec())
        .chain(target.vectors.iter().map(|v| v.dims().to_vec()))
        .collect();
    let got: Vec<Vec<usize>> = tensors
        .matrices
        .iter()
        .chain(&tensors.vectors)
        .map(|t| t.shape().to_vec())
        .collect();
    if want != got {
        return Err(PeftError::InvalidState(format!(
            "combining adapters at `{path}` gave tensors of shapes {got:?}, the new adapter has \
             {want:?} (a bug in the method's combine hook)"
        )));
    }
    Ok(())
}

impl<M: Adaptable + Module> PeftModel<M> {
    /// Build adapter `new_name` from `adapters` (name, weight) as PEFT's `add_weighted_adapter`
    /// does, with the rules of `options.combination_type`.
    ///
    /// The new adapter gets the config of the first adapter with the rank the type implies
    /// (`cat`: the sum of the ranks; SVD types: `svd_rank` or the largest rank; the others: the
    /// common rank), `lora_alpha` equal to that rank, and the union of the target modules; its
    /// `modules_to_save` copies are fresh copies of the base modules, as in PEFT. It is added
    /// inactive: activate it with [`set_adapter`](Self::set_adapter). With a single adapter the
    /// combination is `linear` whatever the type asked for (PEFT's rule).
    ///
    /// Errors, changing nothing: an unknown or existing name, a non-finite weight, invalid
    /// options, two inputs with a `modules_to_save` copy of the same module, and whatever the
    /// method rejects (for LoRA: ranks that differ for the factor-wise types, target modules of
    /// mixed kinds, non-LoRA inputs). PEFT silently keeps an existing `new_name`; this is an
    /// error instead.
    ///
    /// ```
    /// # use burn::tensor::Device;
    /// # use peft_core::{Adaptable, CombineOptions, PeftModel, nn::LinearConfig};
    /// # #[derive(burn::module::Module, Debug, Adaptable)]
    /// # struct Net { proj: peft_core::nn::Linear }
    /// let mut model = PeftModel::new(Net { proj: LinearConfig::new(4, 4).init(&Device::flex()) });
    /// // No method in this crate implements the hook; peft-lora's LoraConfig does.
    /// let err = model.add_weighted_adapter(&[("a", 1.0)], "mix", &CombineOptions::default());
    /// assert!(err.is_err());
    /// ```
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[(&str, f64)],
        new_name: &str,
        options: &CombineOptions,
    ) -> Result<InjectionReport> {
        if adapters.is_empty() {
            return Err(PeftError::invalid_config(
                "adapters",
                "name at least one adapter to combine",
            ));
        }
        if self.adapter_config(new_name).is_some() {
            return Err(PeftError::AdapterExists(new_name.to_string()));
        }
        let mut methods = Vec::with_capacity(adapters.len());
        for (name, weight) in adapters {
            let method = self
                .adapter_config(name)
                .ok_or_else(|| PeftError::AdapterNotFound {
                    name: name.to_string(),
                    available: self.adapter_names(),
                })?;
            if !weight.is_finite() {
                return Err(PeftError::invalid_config(
                    "weights",
                    format!("the weight of `{name}` is {weight}; weights must be finite numbers"),
                ));
            }
            methods.push(method.clone_method());
        }
        let mut options = options.clone();
        // PEFT (`_check_add_weighted_adapter`): "if there is only one adapter, we can only use
        // linear merging".
        if adapters.len() == 1 && options.combination_type != CombinationType::Linear {
            log::info!(
                "one adapter: combination_type `{}` becomes `linear` (as in PEFT)",
                options.combination_type
            );
            options.combination_type = CombinationType::Linear;
        }
        options.validate()?;

        let InputSites {
            attached,
            conflicts,
        } = self.input_sites(adapters);
        if let Some((path, owners)) = conflicts.into_iter().next() {
            return Err(PeftError::IncompatibleAdapters {
                adapters: owners,
                field: "modules_to_save".into(),
                reason: format!(
                    "each of them has its own copy of `{path}`, and copies cannot be combined \
                     (PEFT refuses this too); combine adapters of which at most one saves `{path}`"
                ),
            });
        }
        let inputs: Vec<CombineInput<'_>> = adapters
            .iter()
            .zip(&methods)
            .zip(&attached)
            .map(|(((name, weight), method), sites)| CombineInput {
                name,
                weight: *weight,
                method: method.as_ref(),
                sites,
            })
            .collect();
        let combination = inputs[0].method.combine(&inputs, &options)?;

        let report = self.add_adapter(new_name, combination.config.as_ref())?;
        match self.combined_tensors(adapters, new_name, combination.combiner.as_ref()) {
            Ok(tensors) => {
                self.install(new_name, tensors);
                Ok(report)
            }
            Err(e) => {
                self.discard_adapter(new_name);
                Err(e)
            }
        }
    }

    /// Where each input is attached, and the `modules_to_save` conflicts.
    fn input_sites(&self, adapters: &[(&str, f64)]) -> InputSites {
        let mut attached = vec![Vec::new(); adapters.len()];
        let mut conflicts = Vec::new();
        self.model()
            .visit_sites(&mut SitePath::root(), &mut |path, site| {
                let states = adapters_of(&site);
                for (i, (name, _)) in adapters.iter().enumerate() {
                    if states.iter().any(|s| s.name == *name) {
                        attached[i].push(path.to_string());
                    }
                }
                let owners = copy_owners(&site);
                let mut inputs_with_copy: Vec<String> = Vec::new();
                for (name, _) in adapters {
                    if owners.contains(name) && !inputs_with_copy.iter().any(|n| n == name) {
                        inputs_with_copy.push(name.to_string());
                    }
                }
                if inputs_with_copy.len() > 1 {
                    conflicts.push((path.to_string(), inputs_with_copy));
                }
            });
        InputSites {
            attached,
            conflicts,
        }
    }

    /// Run `combiner` at every site that holds adapter `new_name`, sites in parallel.
    fn combined_tensors(
        &self,
        adapters: &[(&str, f64)],
        new_name: &str,
        combiner: &dyn SiteCombiner,
    ) -> Result<HashMap<String, CombinedTensors>> {
        // Site borrows end with the visit, so the states are cloned (tensors are shared).
        struct Job {
            site: SiteInfo,
            inputs: Vec<(usize, AdapterState)>,
            target: AdapterState,
        }
        let model_device = self
            .model()
            .devices()
            .into_iter()
            .next()
            .unwrap_or_default();
        let mut jobs: Vec<Job> = Vec::new();
        self.model()
            .visit_sites(&mut SitePath::root(), &mut |path, site| {
                let states = adapters_of(&site);
                let Some(target) = states.iter().find(|s| s.name == new_name) else {
                    return;
                };
                let inputs = adapters
                    .iter()
                    .enumerate()
                    .filter_map(|(index, (name, _))| {
                        states
                            .iter()
                            .find(|s| s.name == *name)
                            .map(|state| (index, state.clone()))
                    })
                    .collect();
                let (device, base) = site_device_and_base(&site, model_device.clone(), true);
                jobs.push(Job {
                    site: SiteInfo {
                        path: path.to_string(),
                        kind: site_kind(&site),
                        device,
                        base,
                    },
                    inputs,
                    target: target.clone(),
                });
            });
        // Sites are independent: run them on every core, each thread taking the next site.
        let next = AtomicUsize::new(0);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(jobs.len())
            .max(1);
        let mut results: Vec<(usize, Result<CombinedTensors>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(job) = jobs.get(i) else { break };
                            let inputs: Vec<SiteInput<'_>> = job
                                .inputs
                                .iter()
                                .map(|(index, state)| SiteInput {
                                    index: *index,
                                    state,
                                })
                                .collect();
                            let result = combiner
                                .combine_site(&job.site, &inputs, &job.target)
                                .and_then(|t| {
                                    check_shapes(&job.site.path, &t, &job.target).map(|()| t)
                                });
                            done.push((i, result));
                        }
                        done
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a combination thread panicked"))
                .collect()
        });
        // Report the first failing site in model order, whatever thread found it.
        results.sort_by_key(|(i, _)| *i);
        results
            .into_iter()
            .map(|(i, r)| r.map(|t| (jobs[i].site.path.clone(), t)))
            .collect()
    }

    /// Replace the tensors of adapter `name` with `tensors`, site by site (parameter ids kept).
    fn install(&mut self, name: &str, mut tensors: HashMap<String, CombinedTensors>) {
        self.update(|mut model| {
            model.visit_sites_mut(&mut SitePath::root(), &mut |path, site| {
                let Some(combined) = tensors.remove(&path.to_string()) else {
                    return;
                };
                if let Some(state) = adapters_of_mut(site).iter_mut().find(|s| s.name == name) {
                    for (i, data) in combined.matrices.into_iter().enumerate() {
                        state.set_matrix(i, data);
                    }
                    for (i, data) in combined.vectors.into_iter().enumerate() {
                        state.set_vector(i, data);
                    }
                }
            });
            model
        });
    }
}
