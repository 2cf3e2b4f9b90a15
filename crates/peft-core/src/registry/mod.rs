//! The adapter registry shared by [`PeftModel`](crate::PeftModel) (adapter-aware layers) and
//! [`PeftModule`](crate::burn_modules::PeftModule) (plain Burn modules, adapters in weight
//! space): which adapters exist with their configs, which are active, disabled, frozen, which
//! parameters train and who owns the trainable biases and the classification head.
//!
//! The two wrappers differ only in where adapters live (sites of `peft_core::nn` layers, or
//! Burn parameter reparameterizations); that part is [`AdapterHost`]. Everything else — the
//! switch, merge, add, delete, save and load rules — is written once in [`rules`], and the
//! public methods of both types come from one macro ([`adapter_api!`]), so their signatures
//! cannot drift apart.

mod api;
pub(crate) mod rules;

use std::collections::{HashMap, HashSet};

use burn::module::ParamId;
use serde_json::Value;

use crate::bundle;
use crate::error::{PeftError, Result};
use crate::method::{BiasMode, PeftMethod};

pub(crate) use api::adapter_api;
pub(crate) use rules::{AdapterHost, Purpose};

/// PEFT's `task_type` for sequence classification.
pub(crate) const SEQ_CLS: &str = "SEQ_CLS";

/// The heads PEFT's `PeftModelForSequenceClassification` appends to `modules_to_save`
/// (`classifier_module_names`): `classifier` (BERT-style encoders) and `score` (decoders).
pub(crate) const SEQ_CLS_HEADS: [&str; 2] = ["classifier", "score"];

/// The adapters of one wrapped model and their state: the registry both wrappers share.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdapterRegistry {
    /// Every adapter with the config it was added with (as resolved against the model), in the
    /// order they were added.
    configs: Vec<(String, Box<dyn PeftMethod>)>,
    /// The active adapters, in order.
    pub(crate) active: Vec<String>,
    /// Adapters that never train (PEFT's `inference_mode`), whether active or not.
    pub(crate) frozen: Vec<String>,
    /// Adapters whose `bias` setting made base biases trainable: as in PEFT, only an adapter
    /// that is active when it is added marks biases trainable.
    bias_owners: Vec<String>,
    /// Adapters are bypassed (the base model runs alone).
    pub(crate) disabled: bool,
    /// Every base parameter trains (full fine-tuning).
    pub(crate) train_base: bool,
    /// Modules whose base weights train in full besides the adapters (a linear probe trains
    /// the head alone): module paths of adapter-aware layers, or prefixes of them.
    pub(crate) train_modules: Vec<String>,
    /// The ids of the parameters that train, as the host last computed them.
    pub(crate) trainable: HashSet<ParamId>,
    /// Written into saved configs as `base_model_name_or_path`.
    pub(crate) base_model_name_or_path: Option<String>,
}

impl AdapterRegistry {
    /// The names of every adapter, in the order they were added.
    pub(crate) fn names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The config of adapter `name`, if there is one.
    pub(crate) fn get(&self, name: &str) -> Option<&dyn PeftMethod> {
        self.configs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.as_ref())
    }

    /// The config of adapter `name`, or [`PeftError::AdapterNotFound`] naming the others.
    pub(crate) fn config(&self, name: &str) -> Result<&dyn PeftMethod> {
        self.get(name).ok_or_else(|| PeftError::AdapterNotFound {
            name: name.to_string(),
            available: self.names(),
        })
    }

    /// The adapters that take part in the forward pass: the active ones unless disabled.
    pub(crate) fn forward_adapters(&self) -> Vec<String> {
        if self.disabled {
            Vec::new()
        } else {
            self.active.clone()
        }
    }

    /// The adapters whose tensors train: the active ones that are not frozen (also while
    /// disabled, as in PEFT, where disabling is a context for the forward pass only).
    pub(crate) fn training_adapters(&self) -> Vec<String> {
        self.active
            .iter()
            .filter(|n| !self.frozen.contains(n))
            .cloned()
            .collect()
    }

    /// The `bias` setting of each training adapter that owns the base biases.
    pub(crate) fn bias_modes(&self) -> HashMap<String, BiasMode> {
        let training = self.training_adapters();
        self.configs
            .iter()
            .filter(|(n, _)| self.bias_owners.contains(n) && training.contains(n))
            .map(|(n, m)| (n.clone(), m.bias()))
            .collect()
    }

    /// The adapter that saves a copy of the classification head (one of [`SEQ_CLS_HEADS`] in
    /// its `modules_to_save`), if any.
    pub(crate) fn head_owner(&self) -> Option<&str> {
        self.configs
            .iter()
            .find(|(_, m)| names_a_head(&m.modules_to_save()))
            .map(|(n, _)| n.as_str())
    }

    /// `name` is free for a new adapter: not in use, non-empty, and without '/', '\\' or '.'
    /// (it becomes a key segment and a folder name in PEFT's format).
    pub(crate) fn check_new_name(&self, name: &str) -> Result<()> {
        if self.get(name).is_some() {
            return Err(PeftError::AdapterExists(name.to_string()));
        }
        if name.is_empty() || name.contains(['/', '\\', '.']) {
            return Err(PeftError::invalid_config(
                "adapter_name",
                format!(
                    "`{name}` cannot name an adapter: it must be non-empty and hold no '/', '\\' \
                     or '.'"
                ),
            ));
        }
        Ok(())
    }

    /// Record adapter `name`, added with `method`. The first adapter becomes the active one (as
    /// in PEFT), and owns the base biases its `bias` setting trains.
    pub(crate) fn insert(&mut self, name: &str, method: Box<dyn PeftMethod>) {
        if self.active.is_empty() {
            self.active.push(name.to_string());
            if method.bias() != BiasMode::None {
                self.bias_owners.push(name.to_string());
            }
        }
        self.configs.push((name.to_string(), method));
    }

    /// Forget adapter `name` everywhere in the registry (the host removes its tensors).
    pub(crate) fn remove(&mut self, name: &str) {
        self.configs.retain(|(n, _)| n != name);
        self.bias_owners.retain(|n| n != name);
        self.frozen.retain(|n| n != name);
        self.active.retain(|n| n != name);
    }
}

fn names_a_head(modules_to_save: &[String]) -> bool {
    modules_to_save
        .iter()
        .any(|m| SEQ_CLS_HEADS.contains(&m.as_str()))
}

/// PEFT's rule for sequence classification, in one place: a new adapter whose `task_type` is
/// `SEQ_CLS` gets the heads [`SEQ_CLS_HEADS`] appended to its `modules_to_save` (each once), so
/// the model's freshly initialized head trains and is saved in the adapter's bundle, as
/// `PeftModelForSequenceClassification` does without the caller listing it. Returns the config
/// to add instead of `method`, or `None` when the rule leaves it as it is.
///
/// It does not apply when `method` has no `modules_to_save` field in its saved config (PEFT:
/// `hasattr(peft_config, "modules_to_save")`), nor when another adapter of the model already
/// saves a head: one head trains, with the adapter that brought it, when several adapters run
/// together (PEFT would give each its own copy and refuse to activate them together). Such an
/// adapter can still list the head in `modules_to_save` itself to get its own copy.
///
/// Configs are edited through their saved JSON, the form PEFT's rule acts on, so the rule holds
/// for any method plugin and the saved bundle is what PEFT writes.
pub(crate) fn with_classifier_heads(
    registry: &AdapterRegistry,
    name: &str,
    method: &dyn PeftMethod,
    model_head: Option<&str>,
) -> Result<Option<Box<dyn PeftMethod>>> {
    if method.task_type() != Some(SEQ_CLS) {
        return Ok(None);
    }
    if let Some(owner) = registry.head_owner() {
        log::info!(
            "adapter `{name}` (SEQ_CLS) shares the classification head adapter `{owner}` saves; \
             list the head in its `modules_to_save` to give it a copy of its own"
        );
        return Ok(None);
    }
    let mut config = bundle::method_to_json(method);
    let Some(entry) = config.get_mut("modules_to_save") else {
        if let Some(head) = model_head {
            log::warn!(
                "adapter `{name}` (SEQ_CLS): its method has no `modules_to_save`, so the \
                 classification head `{head}` neither trains nor is saved"
            );
        }
        return Ok(None);
    };
    let mut list: Vec<Value> = match &*entry {
        Value::Array(items) => items.clone(),
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    };
    let listed = list.len();
    for head in SEQ_CLS_HEADS {
        if !list.iter().any(|v| v.as_str() == Some(head)) {
            list.push(Value::String(head.into()));
        }
    }
    if list.len() == listed {
        return Ok(None);
    }
    *entry = Value::Array(list);
    let method: Box<dyn PeftMethod> = serde_json::from_value(config).map_err(|e| {
        PeftError::invalid_config(
            "modules_to_save",
            format!("adding the SEQ_CLS heads {SEQ_CLS_HEADS:?} to the config failed: {e}"),
        )
    })?;
    if let Some(head) = model_head
        && !crate::matching::gets_saved_copy(&method.modules_to_save(), head)
    {
        log::warn!(
            "adapter `{name}` (SEQ_CLS): the model's classification head `{head}` is not one of \
             PEFT's {SEQ_CLS_HEADS:?}; list it in `modules_to_save` to train and save it"
        );
    }
    Ok(Some(method))
}

#[cfg(test)]
mod tests;
