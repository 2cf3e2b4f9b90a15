//! Building an adapter at the sites: target selection under PEFT's matching rules, adapter
//! creation by the method, `modules_to_save` copies.

use std::collections::{HashMap, HashSet};

use burn::module::Module;

use super::{PeftModel, SiteRecord};
use crate::adaptable::Adaptable;
use crate::adapter::AdapterState;
use crate::error::{PeftError, Result};
use crate::matching::{self, all_linear_names};
use crate::method::{PeftMethod, SiteInfo, SiteKind, peft_type_of};
use crate::nn::ModuleCopy;
use crate::registry::rules;

use super::InjectionReport;

impl<M: Adaptable + Module> PeftModel<M> {
    /// Build adapter `name` from `method` (defaults filled in, validated) at every site it
    /// targets under PEFT's matching rules, and the `modules_to_save` copies. Returns what was
    /// adapted and the config as resolved against the sites, when that changed it. Nothing is
    /// changed on error: every adapter is built before any site is touched.
    pub(super) fn inject(
        &mut self,
        name: &str,
        method: &dyn PeftMethod,
    ) -> Result<(InjectionReport, Option<Box<dyn PeftMethod>>)> {
        let sites = self.sites(method.reads_base_weights());
        // Modules named by `target_modules` / `modules_to_save`: linear and embedding sites.
        let module_sites: Vec<&SiteRecord> = sites
            .iter()
            .filter(|s| !matches!(s.kind, SiteKind::KvPrefix { .. }))
            .collect();
        let paths: Vec<String> = module_sites.iter().map(|s| s.path.clone()).collect();
        let to_save = method.modules_to_save();
        rules::warn_unmatched_modules_to_save(&to_save, &paths);
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

        // PEFT's `ModulesToSaveWrapper` copies any module; ours copies linear and embedding
        // weights only.
        if let Some(conv) = module_sites.iter().find(|s| {
            matches!(s.kind, SiteKind::Conv1d { .. } | SiteKind::Conv2d { .. }) && is_saved(&s.path)
        }) {
            return Err(PeftError::UnsupportedSite {
                path: conv.path.clone(),
                kind: format!(
                    "{} named by modules_to_save (a trainable copy of a convolution)",
                    conv.kind.name()
                ),
                method: peft_type_of(method).into(),
            });
        }
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
        Ok((report, resolved))
    }
}
