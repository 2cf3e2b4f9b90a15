//! The weights' side of PEFT bundles for a [`PeftModule`]: the same
//! `adapter_model.safetensors` keys PEFT writes for the same module paths, and reading them back
//! (saving and loading themselves are the shared rules of `crate::registry::rules`).

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::TensorData;

use super::PeftModule;
use super::reparam::Attach;
use crate::bundle::{KEY_PREFIX, TensorFile};
use crate::error::Result;

impl<M: Module> PeftModule<M> {
    /// The tensors of adapter `name` as they go into `adapter_model.safetensors`:
    /// `base_model.model.<module path>.<tensor>` (LoRA: `lora_A.weight` `[r, in]`,
    /// `lora_B.weight` `[out, r]`), with the values the model holds now.
    pub(super) fn export_tensors(&self, name: &str) -> Result<BTreeMap<String, TensorData>> {
        self.registry.config(name)?;
        let mut out = BTreeMap::new();
        for layer in self.read_layers()? {
            for adapter in layer.adapters.iter().filter(|a| a.name == name) {
                for (suffix, data) in adapter.kernel.export(adapter) {
                    out.insert(format!("{KEY_PREFIX}{}.{suffix}", layer.path), data);
                }
            }
        }
        Ok(out)
    }

    /// Replace the freshly created tensors of adapter `name` by the bundle's, and put them into
    /// the model at once (the model, not `layers`, holds an adapter's current values).
    pub(super) fn import_tensors(&mut self, name: &str, file: &mut TensorFile) -> Result<()> {
        let mut layers = self.read_layers()?;
        for layer in &mut layers {
            for adapter in layer.adapters.iter_mut().filter(|a| a.name == name) {
                let kernel = adapter.kernel.clone();
                *adapter = kernel.import(adapter.clone(), &mut file.site(&layer.path))?;
            }
        }
        self.layers = layers;
        self.rebuild(Attach::default());
        Ok(())
    }
}
