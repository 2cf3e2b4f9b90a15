//! The rules both wrappers follow, written once over [`AdapterHost`]: switching, merging,
//! adding, deleting, freezing, saving and loading adapters.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use burn::module::{Param, ParamId};
use burn::tensor::{Tensor, TensorData};

use super::{AdapterRegistry, with_classifier_heads};
use crate::adaptable::DefaultTargets;
use crate::adapter::{AdapterState, BaseWeights, MergeDirection, MergeInput};
use crate::bundle::{self, TensorFile};
use crate::error::{PeftError, Result};
use crate::matching;
use crate::method::{PeftMethod, peft_type_of};
use crate::peft_model::{InjectionReport, LoadReport, TrainableReport};

/// Why an adapter is being attached: to train, or loaded from a bundle (where a weight-space
/// form exact in inference only is accepted, see [`WeightSpace`](crate::WeightSpace)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Added, or loaded to train further.
    Train,
    /// Loaded for inference.
    Load,
}

/// Where a wrapper keeps its adapters' tensors: what differs between
/// [`PeftModel`](crate::PeftModel) and [`PeftModule`](crate::burn_modules::PeftModule). The
/// hooks change the model only; the registry is changed by the rules in this file.
pub(crate) trait AdapterHost {
    /// The state [`restore`](Self::restore) takes back to (the model and what the host keeps
    /// beside it).
    type Snapshot;

    /// The registry.
    fn registry(&self) -> &AdapterRegistry;

    /// The registry, mutably.
    fn registry_mut(&mut self) -> &mut AdapterRegistry;

    /// PEFT's default targets of the model for mapping `table` (see
    /// [`Adaptable::default_targets`](crate::Adaptable::default_targets)).
    fn default_targets(&self, table: &str) -> Option<DefaultTargets>;

    /// The model's classification head, where it names one.
    fn classifier_head(&self) -> Option<String>;

    /// Build adapter `name` from `method` (defaults filled in, validated) on every module it
    /// targets, with `modules_to_save` copies. Returns what was adapted and the config as
    /// resolved against the model, when resolving changed it. On error nothing is changed.
    fn attach(
        &mut self,
        name: &str,
        method: &dyn PeftMethod,
        purpose: Purpose,
    ) -> Result<(InjectionReport, Option<Box<dyn PeftMethod>>)>;

    /// Remove adapter `name`'s tensors and copies from the model (never merged at this point).
    fn detach(&mut self, name: &str) -> Result<()>;

    /// Push the registry's state into the model (which adapters compute, which parameters
    /// train) and record the trainable ids in the registry.
    fn sync(&mut self) -> Result<()>;

    /// Whether some adapter is folded into the base weights.
    fn is_merged(&self) -> bool;

    /// Merge the forward adapters not merged yet (in order), or unmerge the merged ones (in
    /// reverse), with each kernel's `merge`; all or nothing.
    fn fold(&mut self, direction: MergeDirection) -> Result<()>;

    /// The tensors of adapter `name` as they go into `adapter_model.safetensors`.
    fn export(&self, name: &str) -> Result<BTreeMap<String, TensorData>>;

    /// Replace the freshly created tensors of adapter `name` by those of `file`.
    fn import(&mut self, name: &str, file: &mut TensorFile) -> Result<()>;

    /// PEFT's `print_trainable_parameters` numbers for the model as it is.
    fn param_report(&self) -> TrainableReport;

    /// The model as it is, for [`restore`](Self::restore).
    fn snapshot(&self) -> Self::Snapshot;

    /// Put back a [`snapshot`](Self::snapshot).
    fn restore(&mut self, snapshot: Self::Snapshot);
}

/// Activate exactly `names`; merged adapters are unmerged first.
pub(crate) fn set_adapters<H: AdapterHost>(host: &mut H, names: &[&str]) -> Result<()> {
    for name in names {
        host.registry().config(name)?;
    }
    unmerge_first(host)?;
    host.registry_mut().active = names.iter().map(|s| s.to_string()).collect();
    host.sync()
}

/// Disable (merged adapters are unmerged first) or enable the adapters.
pub(crate) fn set_disabled<H: AdapterHost>(host: &mut H, disabled: bool) -> Result<()> {
    if disabled {
        unmerge_first(host)?;
    }
    host.registry_mut().disabled = disabled;
    host.sync()
}

/// Switching with merged adapters would leave them in the base weights, so PEFT unmerges first.
fn unmerge_first<H: AdapterHost>(host: &mut H) -> Result<()> {
    if host.is_merged() {
        log::warn!("adapters are merged; unmerging them first");
        host.fold(MergeDirection::Unmerge)?;
    }
    Ok(())
}

/// Fold the active adapters into the base weights, if each of their methods can merge.
pub(crate) fn merge<H: AdapterHost>(host: &mut H) -> Result<()> {
    let registry = host.registry();
    if registry.disabled {
        return Err(PeftError::InvalidState(
            "adapters are disabled; enable them before merging".into(),
        ));
    }
    for name in &registry.active {
        let method = registry.config(name)?;
        if !method.mergeable() {
            return Err(PeftError::NotSupportedByMethod {
                adapter: name.clone(),
                method: peft_type_of(method).into(),
                reason: "this method has no weight delta to merge".into(),
            });
        }
    }
    host.fold(MergeDirection::Merge)
}

/// `merge_and_unload`'s first half: enable the adapters and merge the active ones.
pub(crate) fn merge_for_unload<H: AdapterHost>(host: &mut H) -> Result<()> {
    if host.registry().disabled {
        set_disabled(host, false)?;
    }
    merge(host)
}

/// One site's (or layer's) fold, for both hosts: merge its active adapters not merged yet, in
/// order, or unmerge its merged ones, in reverse, each kernel seeing the adapters before it;
/// `base` gives the site's stored weights (read only when some adapter is due, so a quantized
/// site without one stays quantized). Returns the new weights, `None` when nothing was due.
/// On error the adapters' `merged` flags may be partly set: the host restores them.
pub(crate) fn fold_site(
    path: &str,
    adapters: &mut [AdapterState],
    direction: MergeDirection,
    base: impl FnOnce() -> BaseWeights,
) -> Result<Option<BaseWeights>> {
    let merging = direction == MergeDirection::Merge;
    let due = |a: &AdapterState| {
        if merging {
            a.active && !a.merged
        } else {
            a.merged
        }
    };
    if !adapters.iter().any(due) {
        return Ok(None);
    }
    let mut current = base();
    let order: Vec<usize> = if merging {
        (0..adapters.len()).collect()
    } else {
        (0..adapters.len()).rev().collect()
    };
    for index in order {
        let (earlier, rest) = adapters.split_at_mut(index);
        let adapter = &mut rest[0];
        if !due(adapter) {
            continue;
        }
        let detached = BaseWeights {
            weight: current.weight.detach(),
            bias: current.bias.map(Tensor::detach),
        };
        let kernel = adapter.kernel.clone();
        current = kernel
            .merge(adapter, MergeInput::new(detached, earlier), direction)
            .map_err(|e| {
                let (verb, preposition) = if merging {
                    ("merging", "into")
                } else {
                    ("unmerging", "from")
                };
                PeftError::InvalidState(format!(
                    "{verb} `{}` {preposition} `{path}` failed: {e}",
                    adapter.name
                ))
            })?;
        adapter.merged = merging;
    }
    Ok(Some(current))
}

/// One adapter's switch state, for both hosts: whether it computes (`forward`), and whether its
/// tensors train (`train`, their ids then recorded in `ids`).
pub(crate) fn switch_adapter(
    adapter: &mut AdapterState,
    forward: bool,
    train: bool,
    ids: &mut HashSet<ParamId>,
) {
    adapter.active = forward;
    fn set<const D: usize>(param: &mut Param<Tensor<D>>, train: bool, ids: &mut HashSet<ParamId>) {
        *param = param.clone().set_require_grad(train);
        if train {
            ids.insert(param.id);
        }
    }
    for p in adapter.matrices.iter_mut() {
        set(p, train, ids);
    }
    for p in adapter.vectors.iter_mut() {
        set(p, train, ids);
    }
}

/// Add a new adapter, PEFT's SEQ_CLS heads included.
pub(crate) fn add_adapter<H: AdapterHost>(
    host: &mut H,
    name: &str,
    method: &dyn PeftMethod,
) -> Result<InjectionReport> {
    host.registry().check_new_name(name)?;
    let head = host.classifier_head();
    let with_heads = with_classifier_heads(host.registry(), name, method, head.as_deref())?;
    insert(
        host,
        name,
        with_heads.as_deref().unwrap_or(method),
        Purpose::Train,
    )
}

/// Attach adapter `name` and record it; the first adapter becomes the active one. A config
/// that names no `target_modules` takes PEFT's default for the model, and is saved with it.
fn insert<H: AdapterHost>(
    host: &mut H,
    name: &str,
    method: &dyn PeftMethod,
    purpose: Purpose,
) -> Result<InjectionReport> {
    let filled = method.with_default_targets(&|table| host.default_targets(table));
    let method: &dyn PeftMethod = filled.as_deref().unwrap_or(method);
    host.registry().check_new_name(name)?;
    method.validate()?;
    if !method.adapts_attention_prefix() && method.targets().target_modules.is_none() {
        return Err(PeftError::invalid_config(
            "target_modules",
            "missing, and PEFT has no default `target_modules` for this model type; name \
             the modules to adapt (e.g. [\"q_proj\", \"v_proj\"]) or use \"all-linear\"",
        ));
    }
    let (report, resolved) = host.attach(name, method, purpose)?;
    let stored = resolved.unwrap_or_else(|| method.clone_method());
    host.registry_mut().insert(name, stored);
    host.sync()?;
    Ok(report)
}

/// Warn about `modules_to_save` entries that match no module: PEFT itself writes such entries
/// (for SEQ_CLS it appends both `classifier` and `score`), so they are not errors.
pub(crate) fn warn_unmatched_modules_to_save(to_save: &[String], paths: &[String]) {
    for entry in to_save {
        if !paths.iter().any(|p| p.ends_with(entry.as_str())) {
            log::warn!(
                "modules_to_save entry `{entry}` matches no layer of the model (closest: {})",
                matching::closest_names(entry, paths, 3).join(", ")
            );
        }
    }
}

/// Remove adapter `name`; merged adapters are unmerged first. If it was active, the remaining
/// active adapters stay active, or else the first remaining adapter becomes active.
pub(crate) fn delete_adapter<H: AdapterHost>(host: &mut H, name: &str) -> Result<()> {
    host.registry().config(name)?;
    unmerge_first(host)?;
    host.detach(name)?;
    let registry = host.registry_mut();
    registry.remove(name);
    if registry.active.is_empty()
        && let Some(first) = registry.names().into_iter().next()
    {
        registry.active.push(first);
    }
    host.sync()
}

/// Remove adapter `name`, just added and never merged nor trained, leaving merged adapters as
/// they are: the rollback of a failed combination.
pub(crate) fn discard_adapter<H: AdapterHost>(host: &mut H, name: &str) -> Result<()> {
    host.detach(name)?;
    host.registry_mut().remove(name);
    host.sync()
}

/// Let adapter `name` train when active, or keep it frozen.
pub(crate) fn set_adapter_trainable<H: AdapterHost>(
    host: &mut H,
    name: &str,
    trainable: bool,
) -> Result<()> {
    host.registry().config(name)?;
    let registry = host.registry_mut();
    registry.frozen.retain(|n| n != name);
    if !trainable {
        registry.frozen.push(name.to_string());
    }
    host.sync()
}

/// Train every parameter of the model (`true`), or the adapters only.
pub(crate) fn set_train_base<H: AdapterHost>(host: &mut H, train: bool) -> Result<()> {
    host.registry_mut().train_base = train;
    host.sync()
}

/// Save adapter `name` as a PEFT bundle under `dir` (`dir` itself for `default`), atomically.
pub(crate) fn save_adapter<H: AdapterHost>(host: &H, dir: &Path, name: &str) -> Result<()> {
    let registry = host.registry();
    let mut config = bundle::method_to_json(registry.config(name)?);
    if let (Some(base), Some(map)) = (&registry.base_model_name_or_path, config.as_object_mut()) {
        map.insert(
            "base_model_name_or_path".into(),
            serde_json::Value::String(base.clone()),
        );
    }
    let weights = bundle::encode_safetensors(&host.export(name)?)?;
    let config_text = bundle::render_config(&config);
    bundle::write_files_atomically(
        &bundle::adapter_dir(dir, name),
        &[
            (bundle::WEIGHTS_FILE, weights.as_slice()),
            (bundle::CONFIG_FILE, config_text.as_bytes()),
        ],
    )
}

/// Load the PEFT bundle in `dir` as adapter `name`; every tensor must be consumed with the right
/// shape, and on any error the model is left as it was. `trainable`: `None` follows the config's
/// `inference_mode` (frozen when `true`, as PEFT writes it on every save).
///
/// The bundle's config is taken as saved: PEFT's SEQ_CLS heads were written into its
/// `modules_to_save` when the adapter was created, and a bundle without them (a second adapter
/// that shared the first one's head) loads without them.
pub(crate) fn load_adapter<H: AdapterHost>(
    host: &mut H,
    dir: &Path,
    name: &str,
    trainable: Option<bool>,
) -> Result<LoadReport> {
    let loaded = bundle::read_config(dir)?;
    let (weights_path, mut file) = TensorFile::read_bundle_weights(dir)?;
    let config_path = dir.join(bundle::CONFIG_FILE);
    // Sizes from the config against the file's tensors before adapters of those sizes are
    // allocated (a failed allocation aborts the process).
    bundle::check_bundle_shapes(loaded.method.as_ref(), &file.shapes())
        .map_err(|e| e.in_file(&config_path))?;
    let purpose = match trainable {
        Some(true) => Purpose::Train,
        _ => Purpose::Load,
    };
    let snapshot = (host.snapshot(), host.registry().clone());
    let result = insert(host, name, loaded.method.as_ref(), purpose)
        .map_err(|e| e.in_file(&config_path))
        .and_then(|_| host.import(name, &mut file))
        .and_then(|()| match file.unused_keys().into_iter().next() {
            Some(key) => Err(PeftError::UnexpectedTensor {
                file: weights_path.clone(),
                key,
            }),
            None => Ok(()),
        });
    if let Err(e) = result {
        let (model, registry) = snapshot;
        host.restore(model);
        *host.registry_mut() = registry;
        return Err(e);
    }
    if !trainable.unwrap_or(!loaded.method.inference_mode()) {
        host.registry_mut().frozen.push(name.to_string());
    }
    host.sync()?;
    Ok(LoadReport {
        unknown_config_keys: loaded.unknown_keys,
    })
}

/// PEFT's `PeftModel.from_pretrained` on a freshly wrapped model: the bundle in `dir` as
/// adapter `default`, trainable or frozen as asked (PEFT's `is_trainable` overrides the
/// config's `inference_mode`), and the base model's name from the bundle.
pub(crate) fn from_pretrained<H: AdapterHost>(
    host: &mut H,
    dir: &Path,
    trainable: bool,
) -> Result<()> {
    load_adapter(host, dir, "default", Some(trainable))?;
    // From the file, not the parsed config: a method without PEFT's common fields drops the key.
    let saved = std::fs::read_to_string(dir.join(bundle::CONFIG_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|config| {
            config
                .get("base_model_name_or_path")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
        });
    if saved.is_some() {
        host.registry_mut().base_model_name_or_path = saved;
    }
    Ok(())
}
