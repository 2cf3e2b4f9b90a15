//! PEFT bundles: saving an adapter (`adapter_config.json` + `adapter_model.safetensors`) and
//! loading one, every tensor consumed and shape-checked.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};

use super::{LoadReport, PeftModel};
use crate::adaptable::{Adaptable, Site, SitePath};
use crate::adapter::TensorSource;
use crate::bundle::{self, KEY_PREFIX, TensorFile};
use crate::error::{PeftError, Result};
use crate::method::BiasMode;
use crate::nn::WeightLayout;

/// Convert a Burn-layout weight to the layout of a Hugging Face file.
fn to_file_layout(weight: Tensor<2>, layout: Option<WeightLayout>) -> TensorData {
    match layout {
        Some(WeightLayout::Linear) => weight.transpose().into_data(),
        _ => weight.into_data(),
    }
}

impl<M: Adaptable + Module> PeftModel<M> {
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

    /// Load the PEFT bundle in `dir` (`adapter_config.json` + `adapter_model.safetensors`, or
    /// PEFT's `adapter_model.bin` pickle) as adapter `name`. Every tensor must be consumed and
    /// have the right shape; on any error the model is left as it was.
    ///
    /// As `PeftModel.from_pretrained(..., is_trainable=False)`, an adapter whose config says
    /// `inference_mode: true` (PEFT writes that on every save) is loaded frozen: it runs but
    /// does not train. [`load_adapter_trainable`](Self::load_adapter_trainable) loads one to
    /// train further.
    pub fn load_adapter(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<LoadReport> {
        self.load_adapter_with(dir.as_ref(), name, None)
    }

    /// [`load_adapter`](Self::load_adapter) for training: the adapter trains when active,
    /// whatever its config's `inference_mode` (PEFT's `is_trainable=True`).
    pub fn load_adapter_trainable(
        &mut self,
        dir: impl AsRef<Path>,
        name: &str,
    ) -> Result<LoadReport> {
        self.load_adapter_with(dir.as_ref(), name, Some(true))
    }

    fn load_adapter_with(
        &mut self,
        dir: &Path,
        name: &str,
        trainable: Option<bool>,
    ) -> Result<LoadReport> {
        let loaded = bundle::read_config(dir)?;
        let (weights_path, mut file) = TensorFile::read_bundle_weights(dir)?;
        // Sizes from the config against the file's tensors before `add_adapter` allocates
        // adapters of those sizes (a failed allocation aborts the process).
        bundle::check_bundle_shapes(loaded.method.as_ref(), &file.shapes())
            .map_err(|e| e.in_file(&dir.join(bundle::CONFIG_FILE)))?;
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
        if !trainable.unwrap_or(!loaded.method.inference_mode()) {
            self.frozen.push(name.to_string());
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
                        let data = site.take("base_layer.weight", &slots.dims)?;
                        let t = Tensor::<2>::from_data(data, &device);
                        *weight = weight.clone().map(|_| t);
                        // The table is dense from now on.
                        if let Some(q) = slots.quantized.as_deref_mut() {
                            *q = None;
                        }
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
