//! Adding an adapter to a plain Burn module: PEFT's matching on Burn's module paths, then the
//! method's adapters for the matched layers.

use burn::module::Module;
use burn::tensor::Tensor;

use super::reparam::{self, Attach};
use super::scan::{ModuleTree, ValuesAt};
use super::{AdaptedLayer, PeftModule};
use crate::adapter::{AdapterState, BaseWeights, WeightSpace};
use crate::error::{PeftError, Result};
use crate::matching::{self, all_linear_names, select_targets};
use crate::method::{BiasMode, PeftMethod, SiteInfo, peft_type_of};
use crate::peft_model::InjectionReport;
use crate::registry::{Purpose, SEQ_CLS, rules};

impl<M: Module> PeftModule<M> {
    /// Build adapter `name` from `method` (defaults filled in, validated) on every layer it
    /// targets and attach it. Returns what was adapted and the config as resolved against the
    /// layers, when that changed it. Nothing is changed on error.
    ///
    /// Errors: [`PeftError::TargetNotFound`] for a `target_modules` entry that matches no module
    /// (with the closest names), [`PeftError::UnsupportedSite`] for a target that is no
    /// `Linear` / `Embedding` (a `LayerNorm`, an attention block, a `Vec`) or a kind the method
    /// does not adapt, [`PeftError::NotSupportedByMethod`] for a method without a weight-space
    /// form (or, for training, one exact in inference only, such as LoRA with dropout), and
    /// [`PeftError::Unsupported`] for `modules_to_save` entries naming a module, a `bias` other
    /// than `none` and prefix tuning.
    pub(super) fn inject(
        &mut self,
        name: &str,
        method: &dyn PeftMethod,
        purpose: Purpose,
    ) -> Result<(InjectionReport, Option<Box<dyn PeftMethod>>)> {
        let tree = ModuleTree::of(&self.model);
        let paths = tree.paths();
        refuse_unsupported_options(method, &paths)?;
        let mut layers = self.read_layers()?;
        self.refuse_other_reparameterizations(&tree)?;

        let excluded: Vec<String> = self.output_layer.iter().cloned().collect();
        let all_linear = all_linear_names(&tree.linear_paths(), &excluded);
        let targets = select_targets(&method.targets(), &paths, &all_linear, &|_| false)?;
        let mut kinds = Vec::with_capacity(targets.len());
        for path in &targets {
            let node = tree
                .get(path)
                .expect("targets are module paths of the tree");
            let kind = node
                .site_kind()
                .filter(|k| method.supports(k))
                .ok_or_else(|| PeftError::UnsupportedSite {
                    path: path.clone(),
                    kind: node.kind_name(),
                    method: peft_type_of(method).into(),
                })?;
            kinds.push(kind);
        }
        let infos = self.site_infos(&targets, kinds);
        let resolved = method.resolve(&infos)?;
        let method: &dyn PeftMethod = resolved.as_deref().unwrap_or(method);
        let mut built = Vec::with_capacity(infos.len());
        for info in &infos {
            let state = method.create_adapter(name, info)?;
            check_weight_space(&state, &info.path, method, purpose)?;
            built.push((info, state));
        }

        let mut report = InjectionReport::default();
        for (info, state) in built {
            report.adapted.push(info.path.clone());
            match layers.iter_mut().find(|l| l.path == info.path) {
                Some(layer) => layer.adapters.push(state),
                None => layers.push(AdaptedLayer {
                    path: info.path.clone(),
                    adapters: vec![state],
                }),
            }
        }
        self.layers = layers;
        // The new adapters' parameters exist only in `layers` until attached to the model.
        self.rebuild(Attach::default());
        Ok((report, resolved))
    }

    /// Reparameterizations that are not ours (Burn's `apply_lora`), or ours from another
    /// `PeftModule`, cannot be stacked on (Burn keeps one per parameter).
    fn refuse_other_reparameterizations(&self, tree: &ModuleTree) -> Result<()> {
        for (param, reparameterization) in &tree.reparameterized {
            let ours = reparameterization == reparam::NAME
                && self.layers.iter().any(|l| &l.weight_path() == param);
            if !ours {
                return Err(PeftError::InvalidState(format!(
                    "parameter `{param}` already carries a `{reparameterization}` reparameterization (Burn's Module::apply_lora, or adapters of another PeftModule); a parameter holds one: fold it first (Module::materialize, PeftModule::merge_and_unload) or add the adapters through that PeftModule"
                )));
            }
        }
        Ok(())
    }

    /// What each target looks like, with its base weights (as the unadapted forward sees them).
    fn site_infos(&self, targets: &[String], kinds: Vec<crate::SiteKind>) -> Vec<SiteInfo> {
        let params: Vec<String> = targets
            .iter()
            .flat_map(|p| [format!("{p}.weight"), format!("{p}.bias")])
            .collect();
        let mut values = ValuesAt::of(&self.model, &params);
        let mut take = |path: String| values.remove(&path);
        targets
            .iter()
            .zip(kinds)
            .map(|(path, kind)| {
                let (weight, _) = take(format!("{path}.weight"))
                    .and_then(|w| reparam::as_matrix(w.as_ref()))
                    .expect("a Linear / Embedding / Conv2d site holds a rank-2 or rank-4 weight");
                let bias =
                    take(format!("{path}.bias")).and_then(|b| reparam::ranked::<1>(b.as_ref()));
                let weights = current_base(weight, bias, &self.layers, path);
                SiteInfo {
                    path: path.clone(),
                    kind,
                    device: weights.weight.device(),
                    base: Some(weights),
                }
            })
            .collect()
    }
}

/// The base weights a new adapter at `path` sees: the stored weights with the adapters already
/// merged there taken out again (as `MergeInput::unmerged` gives kernels).
fn current_base(
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    layers: &[AdaptedLayer],
    path: &str,
) -> BaseWeights {
    let base = BaseWeights { weight, bias };
    let Some(layer) = layers.iter().find(|l| l.path == path) else {
        return base;
    };
    let input = crate::adapter::MergeInput::new(base.clone(), &layer.adapters);
    input.unmerged().unwrap_or(base)
}

/// Options this path does not implement. `modules_to_save` entries that name no module are
/// warnings, as in `PeftModel` (PEFT's SEQ_CLS rule appends both `classifier` and `score`).
fn refuse_unsupported_options(method: &dyn PeftMethod, paths: &[String]) -> Result<()> {
    let reason = "the weight-space path for plain Burn modules does not implement it; build the model from peft_core::nn layers and use PeftModel";
    if method.adapts_attention_prefix() {
        return Err(PeftError::unsupported(
            "peft_type",
            peft_type_of(method),
            format!("prompt learning needs an attention key/value site: {reason}"),
        ));
    }
    let to_save = method.modules_to_save();
    rules::warn_unmatched_modules_to_save(&to_save, paths);
    if let Some(first) = paths
        .iter()
        .find(|p| matching::gets_saved_copy(&to_save, p))
    {
        let seq_cls = if method.task_type() == Some(SEQ_CLS) {
            " (task_type SEQ_CLS adds PEFT's heads `classifier` and `score`)"
        } else {
            ""
        };
        return Err(PeftError::unsupported(
            "modules_to_save",
            format!("{to_save:?}"),
            format!("trainable copies of whole modules, here `{first}`{seq_cls}: {reason}"),
        ));
    }
    let bias = method.bias();
    if bias != BiasMode::None {
        return Err(PeftError::unsupported(
            "bias",
            format!("{bias:?}").to_lowercase(),
            format!("trainable base biases: {reason}"),
        ));
    }
    Ok(())
}

/// Refuse adapters whose kernel has no weight-space form (or, for training, one exact in
/// inference only).
fn check_weight_space(
    state: &AdapterState,
    path: &str,
    method: &dyn PeftMethod,
    purpose: Purpose,
) -> Result<()> {
    let refuse = |reason: String| PeftError::NotSupportedByMethod {
        adapter: state.name.clone(),
        method: peft_type_of(method).into(),
        reason: format!("cannot adapt the plain Burn layer `{path}` in weight space: {reason}"),
    };
    match state.kernel.weight_space() {
        WeightSpace::Exact => Ok(()),
        WeightSpace::Unsupported(reason) => Err(refuse(reason)),
        WeightSpace::InferenceOnly(reason) if purpose == Purpose::Train => Err(refuse(format!(
            "{reason} (loading such an adapter for inference works: PeftModule::load_adapter)"
        ))),
        WeightSpace::InferenceOnly(reason) => {
            log::warn!(
                "adapter `{}` at `{path}`: {reason}; its outputs are exact, but training it further would train without it",
                state.name
            );
            Ok(())
        }
    }
}
