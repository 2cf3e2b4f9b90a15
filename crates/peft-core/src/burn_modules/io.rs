//! PEFT bundles for a [`PeftModule`]: the same `adapter_config.json` and
//! `adapter_model.safetensors` keys PEFT writes for the same module paths.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::TensorData;

use super::PeftModule;
use super::inject::Purpose;
use super::reparam::Attach;
use crate::bundle::{self, KEY_PREFIX, TensorFile};
use crate::error::{PeftError, Result};
use crate::peft_model::LoadReport;

impl<M: Module> PeftModule<M> {
    /// The tensors of adapter `name` as they go into `adapter_model.safetensors`:
    /// `base_model.model.<module path>.<tensor>` (LoRA: `lora_A.weight` `[r, in]`,
    /// `lora_B.weight` `[out, r]`), with the values the model holds now.
    pub fn adapter_tensors(&self, name: &str) -> Result<BTreeMap<String, TensorData>> {
        self.config(name)?;
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

    /// Save adapter `name` as a PEFT bundle under `dir` (`dir` itself for `default`, else
    /// `dir/<name>`), atomically: on any failure the previous bundle is left as it was.
    pub fn save_adapter(&self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        let method = self.config(name)?;
        let mut config = bundle::method_to_json(method);
        if let (Some(base), Some(map)) = (&self.base_model_name_or_path, config.as_object_mut()) {
            map.insert(
                "base_model_name_or_path".into(),
                serde_json::Value::String(base.clone()),
            );
        }
        let weights = bundle::encode_safetensors(&self.adapter_tensors(name)?)?;
        let config_text = bundle::render_config(&config);
        bundle::write_files_atomically(
            &bundle::adapter_dir(dir.as_ref(), name),
            &[
                (bundle::WEIGHTS_FILE, weights.as_slice()),
                (bundle::CONFIG_FILE, config_text.as_bytes()),
            ],
        )
    }

    /// Load the PEFT bundle in `dir` as adapter `name`: its config picks the method and the
    /// layers (by module path), and every tensor must be consumed with the right shape
    /// ([`PeftError::MissingTensor`], [`PeftError::UnexpectedTensor`],
    /// [`PeftError::ShapeMismatch`] name the file and key). On any error the model is left as
    /// it was.
    ///
    /// An adapter whose weight-space form is exact only in inference (LoRA trained with
    /// `lora_dropout`) loads with a warning: its outputs are exact, training it further here
    /// would train it without dropout.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<LoadReport> {
        let dir = dir.as_ref();
        let loaded = bundle::read_config(dir)?;
        let (weights_path, mut file) = TensorFile::read_bundle_weights(dir)?;
        let snapshot = (
            self.model.clone(),
            self.layers.clone(),
            self.configs.clone(),
            self.active.clone(),
            self.trainable.clone(),
        );
        let result = self
            .insert_adapter(name, loaded.method.as_ref(), Purpose::Load)
            .map_err(|e| e.in_file(&dir.join(bundle::CONFIG_FILE)))
            .and_then(|_| self.import(name, &mut file))
            .and_then(|()| match file.unused_keys().into_iter().next() {
                Some(key) => Err(PeftError::UnexpectedTensor {
                    file: weights_path.clone(),
                    key,
                }),
                None => Ok(()),
            });
        if let Err(e) = result {
            (
                self.model,
                self.layers,
                self.configs,
                self.active,
                self.trainable,
            ) = snapshot;
            return Err(e);
        }
        Ok(LoadReport {
            unknown_config_keys: loaded.unknown_keys,
        })
    }

    /// Replace the freshly created tensors of adapter `name` by the bundle's.
    fn import(&mut self, name: &str, file: &mut TensorFile) -> Result<()> {
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
