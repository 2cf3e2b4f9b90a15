//! Loading a bundle next to others: what a bundle must not do to the shared base, and a load
//! that a panicking method plugin cannot turn into a dead scheduler.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use peft_core::bundle::{self, KEY_PREFIX, TensorFile};
use peft_core::{BiasMode, PeftError, PeftModel, peft_type_of};
use peft_models::HfModel;

use crate::api::unix_now;
use crate::registry::AdapterInfo;

/// Why a bundle cannot be served next to other adapters, or `Ok` when it can (or when it
/// cannot be read: the load that follows reports that with its own error).
///
/// Loading a bundle writes into the model every adapter shares when the bundle holds base
/// tensors: trained biases (PEFT's `bias: all` / `lora_only`) and full embedding tables
/// (`base_layer.weight`, PEFT's `save_embedding_layers`). A server would then answer `base` and
/// every other adapter differently, and unloading would not undo it, so such bundles are
/// refused. The rules mirror what `PeftModel::load_adapter` takes from a file.
pub(crate) fn check_shared_base(dir: &Path) -> Result<(), String> {
    let (Ok(loaded), Ok((_, file))) = (
        bundle::read_config(dir),
        TensorFile::read_bundle_weights(dir),
    ) else {
        return Ok(());
    };
    let keys: Vec<String> = file.shapes().into_keys().collect();
    let module = |key: &str, suffix: &str| {
        key.strip_suffix(suffix)
            .map(|k| k.strip_prefix(KEY_PREFIX).unwrap_or(k).to_string())
    };
    if let Some(path) = keys.iter().find_map(|k| module(k, ".base_layer.weight")) {
        return Err(format!(
            "the bundle holds a whole embedding table for `{path}` (`base_layer.weight`, \
             PEFT's save_embedding_layers): loading it would replace the base model's table \
             that `base` and every other adapter use. Save the adapter without embedding \
             layers, or serve it merged into its own model folder (`burn-peft merge`)"
        ));
    }
    let method = loaded.method;
    if method.bias() == BiasMode::None {
        return Ok(());
    }
    let trained_bias = keys.iter().find_map(|k| {
        let stem = k.strip_suffix(".bias")?;
        // A `modules_to_save` copy saves its bias next to its weight; a trained base bias
        // comes alone (or as `base_layer.bias` on an adapted layer).
        let alone = !keys.contains(&format!("{stem}.weight"));
        (stem.ends_with(".base_layer") || alone).then(|| module(k, ".bias").unwrap_or_default())
    });
    match trained_bias {
        Some(path) => Err(format!(
            "the bundle trains the base model's biases (`bias: {}` in adapter_config.json; \
             e.g. `{path}.bias`): loading it would change the biases that `base` and every \
             other adapter use. Retrain with `bias: none`, or serve it merged into its own \
             model folder (`burn-peft merge`)",
            match method.bias() {
                BiasMode::All => "all",
                _ => "lora_only",
            }
        )),
        None => Ok(()),
    }
}

/// Why [`load`] failed.
pub(crate) enum LoadFailure {
    /// The bundle cannot be loaded (the model is unchanged).
    Bundle(PeftError),
    /// The method's code panicked; the model was put back as it was.
    Panic(String),
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Load `dir` as adapter `name` and describe it (`shown` is the folder as clients see it).
/// A panic inside (a method plugin's bug) is caught and the model restored, so the
/// scheduler thread that calls this never dies of it.
pub(crate) fn load(
    model: &mut PeftModel<HfModel>,
    name: &str,
    dir: &Path,
    shown: String,
) -> Result<AdapterInfo, LoadFailure> {
    // Cloning a Burn module shares its tensors: a cheap snapshot to restore after a panic.
    let snapshot = model.model().clone();
    let result = catch_unwind(AssertUnwindSafe(|| load_unguarded(model, name, dir, shown)));
    match result {
        Ok(result) => result.map_err(LoadFailure::Bundle),
        Err(panic) => {
            model.update(|_| snapshot);
            if model.adapter_config(name).is_some() {
                // The panic came after the adapter was registered: forget it again.
                let _ = catch_unwind(AssertUnwindSafe(|| model.delete_adapter(name)));
            }
            Err(LoadFailure::Panic(panic_message(panic.as_ref())))
        }
    }
}

fn load_unguarded(
    model: &mut PeftModel<HfModel>,
    name: &str,
    dir: &Path,
    shown: String,
) -> Result<AdapterInfo, PeftError> {
    model.load_adapter(dir, name)?;
    let peft_type = model
        .adapter_config(name)
        .map_or("unknown", peft_type_of)
        .to_string();
    // The prefix length of this adapter alone: make it the active one for a moment (rows of
    // a mixed batch choose their adapter; the active set is not used while serving).
    let previous: Vec<String> = model.active_adapters().to_vec();
    model.set_adapter(name)?;
    let prefix_len = model.model().prefix_len();
    let previous: Vec<&str> = previous.iter().map(String::as_str).collect();
    if !previous.is_empty() {
        model.set_adapters(&previous)?;
    }
    Ok(AdapterInfo {
        name: name.to_string(),
        path: dir.to_path_buf(),
        shown_path: shown,
        peft_type,
        prefix_len,
        loaded_at: unix_now(),
        draining: false,
    })
}
