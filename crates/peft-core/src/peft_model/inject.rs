//! Adding and removing adapters: target selection under PEFT's matching rules, adapter
//! creation by the method, `modules_to_save` copies.

use std::collections::{HashMap, HashSet};

use burn::module::Module;

use super::{PeftModel, SiteRecord, check_new_adapter_name};
use crate::adaptable::Adaptable;
use crate::adapter::AdapterState;
use crate::error::{PeftError, Result};
use crate::matching::{self, all_linear_names};
use crate::method::{BiasMode, PeftMethod, SiteInfo, SiteKind, peft_type_of};
use crate::nn::ModuleCopy;

use super::InjectionReport;

impl<M: Adaptable + Module> PeftModel<M> {
    /// Inject adapter `name` built from `method`, freeze every base parameter, and make the
    /// adapter trainable. The first adapter added becomes the active one (as in PEFT).
    ///
    /// A config that names no `target_modules` takes PEFT's default for the model type
    /// ([`Adaptable::default_targets`]), and is saved with it, as PEFT does; a model without
    /// defaults makes that an error asking for `target_modules`.
    pub fn add_adapter(&mut self, name: &str, method: &dyn PeftMethod) -> Result<InjectionReport> {
        let filled = method.with_default_targets(&|table| self.model.default_targets(table));
        let method: &dyn PeftMethod = filled.as_deref().unwrap_or(method);
        check_new_adapter_name(&self.configs, name)?;
        method.validate()?;
        if !method.adapts_attention_prefix() && method.targets().target_modules.is_none() {
            return Err(PeftError::invalid_config(
                "target_modules",
                "missing, and PEFT has no default `target_modules` for this model type; name \
                 the modules to adapt (e.g. [\"q_proj\", \"v_proj\"]) or use \"all-linear\"",
            ));
        }
        let sites = self.sites(method.reads_base_weights());
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
                // The trainable copy of a quantized site starts from its dequantized weight.
                let dense = match slots.quantized.as_deref().and_then(Option::as_ref) {
                    Some(q) => {
                        let device = weight.lazy_device();
                        let table = q.dequantize(&device);
                        let value = if slots.layout.is_some() {
                            table.transpose()
                        } else {
                            table
                        };
                        Some(burn::module::Param::from_tensor(value))
                    }
                    None => None,
                };
                copies.push(ModuleCopy::new(
                    name,
                    dense.as_ref().unwrap_or(weight),
                    bias,
                ));
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
        self.frozen.retain(|n| n != name);
        self.active.retain(|n| n != name);
        if self.active.is_empty()
            && let Some((first, _)) = self.configs.first()
        {
            self.active.push(first.clone());
        }
        self.refresh();
        Ok(())
    }
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
        self.frozen.retain(|n| n != name);
        self.active.retain(|n| n != name);
        self.refresh();
    }
}
